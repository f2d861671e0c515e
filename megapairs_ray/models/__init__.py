"""Model builders: names and configs in, ready-to-run encoders out."""
