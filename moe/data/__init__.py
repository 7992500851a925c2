"""Input: corpora as TFDS datasets (corpus.py, tfrecord_source.py), SentencePiece (tokenizer.py) and the
grain pipelines that pack them into batches (pipeline.py).

Owns: everything between a text source and a host-local numpy batch. Must not import the model or jax
device code: batches become device arrays in moe/train/steps.py.
"""
