"""Chat data: reading and validating the formats (load.py, formats.py), the chat template and
the assistant mask (template.py), packing into batches (packing.py); the `data` tools (tools.py)."""

from .load import (MAX_SHOWN, SPLIT_FILES, Dataset, Example, FileData, Problem, fingerprint,
                   keyword_hit, load_dir, load_file, load_questions, read_file, split_file, write_atomic,
                   write_records)
from .packing import PACK_ROW, Batch, batches, collate
from .template import (CHATML, IGNORE, Tokenized, count_tokens, ensure_chat_template, render,
                       tokenize, tokenize_all)
