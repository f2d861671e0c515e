"""Every reject reason, in one place: the short stable codes the manifest counts
(``rejects``) and ``RUN/rejects/<stage>/`` holds (``io/rejects.py``). A reject with a code not
listed here is an internal error: ``reject_row`` refuses it."""

from __future__ import annotations


class Reason:
    """Reject reason codes, by the stage that gives them first."""

    # ingest: a record (or its whole shard) that cannot be used
    EMPTY_BYTES = "empty_bytes"
    TOO_MANY_BYTES = "too_many_bytes"
    NOT_AN_IMAGE = "not_an_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_SMALL = "too_small"
    EXTREME_ASPECT = "extreme_aspect_ratio"
    UNUSUAL_MODE = "unusual_mode"
    CORRUPT_IMAGE = "corrupt_image"
    MISSING_IMAGE = "missing_image"
    MISSING_CAPTION = "missing_caption"
    EMPTY_CAPTION = "empty_caption"
    DUPLICATE_KEY = "duplicate_key"
    TAR_TRUNCATED = "tar_truncated"
    NOT_A_TAR = "not_a_tar"  # a .tar file with no tar header at its start
    COMPRESSED_TAR = "compressed_tar"  # gzip/bzip2/xz/zstd: offsets could not be fetched back
    DUPLICATE_MEMBER = "duplicate_member"  # the same member name twice in a row in a tar
    UNDECODABLE_NAME = "undecodable_name"  # a file or member name that is not UTF-8
    SHARD_UNREADABLE = "shard_unreadable"
    MISSING_COLUMN = "missing_column"
    BAD_COLUMN_TYPE = "bad_column_type"
    SOURCE_CHANGED = "source_changed"
    INVALID_RECORD = "invalid_record"
    # embed, the gallery, describe, export: an image whose bytes cannot be used again
    DECODE_FAILED = "decode_failed"
    UNREADABLE_IMAGE = "unreadable_image"  # its bytes could not be read back from where they live
    # index
    NON_FINITE_VECTOR = "non_finite_vector"
    # mine, export, and training's triplet checks
    TOO_FEW_HARD_NEGATIVES = "too_few_hard_negatives"
    # describe (the vision-language model's answer)
    EMPTY_DESCRIPTION = "empty_description"
    TRUNCATED = "truncated"  # the answer hit max_tokens
    TOO_SHORT = "too_short"
    # instruct (the LLM's answer)
    NO_LIST = "no_list"
    TOO_FEW_INSTRUCTIONS = "too_few_instructions"
    # training's prepared rows: a triplet record, or a captioned image for alignment
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_Q_IMG = "missing_q_img"
    MISSING_Q_TEXT = "missing_q_text"
    MISSING_T_IMG = "missing_t_img"
    MISSING_HNS = "missing_hns"
    BAD_Q_IMG = "bad_q_img"
    BAD_T_IMG = "bad_t_img"
    NO_INSTRUCTION = "no_instruction"
    BAD_HNS = "bad_hns"
    TARGET_IS_QUERY = "target_is_query"
    HELD_OUT = "held_out"
    NO_CAPTION = "no_caption"
    # MMEB-train rows the retriever families cannot train on (``io/triplets.from_mmeb_train``)
    TEXT_TARGET = "text_target"  # the positive has no image
    TEXT_QUERY = "text_query"  # the query has no image


ALL = frozenset(v for k, v in vars(Reason).items() if k.isupper())
