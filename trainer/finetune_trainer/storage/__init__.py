"""Object storage for the trainer: s3:// and file:// behind one interface, and the node-local pull cache.

``open_store(uri, storage_config)`` returns an ``ObjectStore`` rooted at ``uri``; ``pull_model`` / ``pull_dataset``
bring inputs into the node cache. One module per concern:

- ``errors``: ``StorageError``, which failures are permanent or transient, the one retry loop (``RetryPolicy``);
- ``checksums``: ETags, CRC32/SHA checksums (whole and composite) computed while ranges arrive, ``sha256_file``;
- ``object_store``: the ``ObjectStore`` interface and the ``TransferSettings`` stores share;
- ``s3_store``: ranged, verified, resumable downloads and multipart uploads over boto3;
- ``file_store``: a local folder as a store, and atomic local writes;
- ``uris``: URIs parsed and the store each names opened;
- ``node_cache``: the per-node pull cache of models and datasets.

The names below are the API the rest of the trainer uses; the modules' other names are theirs.
"""

from finetune_trainer.storage.checksums import sha256_file
from finetune_trainer.storage.errors import RetryPolicy, StorageError, call_with_retries, is_permanent, is_transient
from finetune_trainer.storage.file_store import FileStore
from finetune_trainer.storage.node_cache import PulledFile, cache_folder_name, pull_dataset, pull_model
from finetune_trainer.storage.object_store import (
    DOWNLOAD,
    UPLOAD,
    ByteHook,
    MiB,
    ObjectInfo,
    ObjectStore,
    TransferSettings,
    background_upload_streams,
)
from finetune_trainer.storage.s3_store import S3Store, make_s3_client
from finetune_trainer.storage.uris import open_store, parent_uri, split_uri

__all__ = [
    "DOWNLOAD",
    "UPLOAD",
    "ByteHook",
    "FileStore",
    "MiB",
    "ObjectInfo",
    "ObjectStore",
    "PulledFile",
    "RetryPolicy",
    "S3Store",
    "StorageError",
    "TransferSettings",
    "background_upload_streams",
    "cache_folder_name",
    "call_with_retries",
    "is_permanent",
    "is_transient",
    "make_s3_client",
    "open_store",
    "parent_uri",
    "pull_dataset",
    "pull_model",
    "sha256_file",
    "split_uri",
]
