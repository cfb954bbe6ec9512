"""What the chapters share (not part of the library; needs the ``course`` extra):

- ``data``: the digits data set (scikit-learn's bundled copy) and mini-batches.
- ``nets``: the running example's MLP, its training loop and accuracy.
- ``plotting``: the book's figure style.
- ``experiments``: training runs recorded and replayed with other estimators (chapter 6).
- ``testtime``: predictions with batch statistics (chapter 2), a temperature series (chapter 3).
- ``parallel``: data parallelism simulated in one process, and chapter 9's worker functions.
"""
