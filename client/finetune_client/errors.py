"""What can go wrong for a client user, each as one line that names what was wrong (the ``ftj`` command prints it)."""

from __future__ import annotations


class ClientError(Exception):
    """Any failure the client reports; ``str()`` is one line meant for a person."""


class ClusterUnreachable(ClientError):
    """No Kubernetes configuration, or the API server did not answer."""


class JobNotFound(ClientError):
    """No FineTuneJob of that name in the namespace."""


class InvalidJob(ClientError):
    """The job does not match the CRD's schema (checked locally), or the API server refused it."""


class DataRejected(ClientError):
    """A dataset row does not fit the chosen format; the message is ``<file>:<line>: <problem>``."""


class StorageFailed(ClientError):
    """S3 refused or failed a request, had no credentials, or an object the job should have written is missing."""


class LogNotFound(ClientError):
    """Neither the node's pod of that attempt nor the copy of its log the trainer uploads exists."""
