"""Interoperability with other recommendation libraries (optional extras).

``torchrec``: :class:`~.torchrec.CompressedEmbeddingBagCollection` puts any of our tables behind TorchRec's
EmbeddingBagCollection interface. Importing it needs TorchRec (see that module for the CPU install).
"""
