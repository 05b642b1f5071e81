"""What the notebooks share: their figures (``figures``) and their sizes (``sizes``).

Not part of the library: ``mimo_jax`` never imports it. The notebooks import it as
``notebooks.<module>`` with the repository root on ``sys.path`` (their setup cell puts it there).
"""
