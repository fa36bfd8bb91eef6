"""Block sizes of the LM-head kernel (headloss.py), free of torch: the memory estimate
(train/memory.py) reads them before any model loads."""

CHUNK = 512  # positions at a time: the head is read once per CHUNK labelled positions
BLOCK = 4096  # vocabulary rows at a time: CHUNK x BLOCK float32 logits (8 MB)
