"""Downstream evaluation on frozen embeddings: labels, patient splits, classification probe,
survival (Cox probe, deep Cox loss, pair-count C-index, federated Newton Cox), attention-MIL
pooling of tile embeddings, and the plots. Pure math: nothing here knows about Flower.
"""
