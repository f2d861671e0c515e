"""Serving the trained retriever.

- ``gallery``: the gallery's plain pieces (no Ray): the candidate encoder stage, the gallery's
  layout and its ``gallery.json`` contract. ``pipeline/gallery.py`` runs it on Ray Data like any
  batch stage: ingest (or a finished run's images table) → embed with the retriever checkpoint →
  the index stage's sharded FAISS build.
- ``search``: ``GallerySearcher``, the gallery index and metadata loaded once, searched many times.
- ``api``: the HTTP surface (FastAPI): request parsing, limits, errors, auth, the search page.
- ``app``: the Ray Serve application: thin deployments over ``RetrieverEncoder`` and
  ``GallerySearcher``, composed with ``DeploymentHandle``s.
- ``config``: the gallery job's config and the application's arguments (pydantic), and the
  Ray Serve config file that carries them.
"""
