"""Data: ``raw/<class>/<images>`` folders, stratified split index files, safe decoding, loaders.

Modules (import the one you need; this package imports nothing heavy, so the CLI can import
``mltrack.data.splits`` without pulling in torch):

- ``index``: class map from raw/, index files, the single path validator (``validate_relpath``).
- ``splits``: ``make_splits`` (stratified, group-aware k-fold + shared test set), ``split_digest``.
- ``images``: ``load_rgb`` / ``verify``: header size limit, full decode, EXIF, RGB conversion.
- ``transforms``: ``TRANSFORMS`` registry and ``build_transform`` (torch).
- ``dataset``, ``loaders``: ``ImageListDataset`` and ``build_loaders`` (torch).
- ``demo``: the scikit-learn digits demo dataset.
"""
