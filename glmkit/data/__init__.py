"""Data: tokenizers, the built-in corpora, and the two objectives' batches — GLM's blank infilling (lesson 01) and
next-token prediction (lessons 03 on). Each batch stream is a pure function of (seed, step), so a resumed run sees
the batches it would have seen."""
