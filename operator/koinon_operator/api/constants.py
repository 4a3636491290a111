"""Names shared by the CRDs, the operator and the tooling."""

from __future__ import annotations

from enum import StrEnum

GROUP = "koinon.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
AIJOB_PLURAL = "aijobs"
VOLUNTEER_PLURAL = "volunteernodes"
FINALIZER = "koinon.dev/ray-job-cleanup"
SUBMISSION_PREFIX = "koinon"
# Ray metadata key of every submission: "<namespace>/<name>" of its AIJob (the orphan sweep reads it).
AIJOB_METADATA_KEY = "koinon.dev/aijob"


class Phase(StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)

    @property
    def holds_nodes(self) -> bool:
        """Phases in which the job owns capacity on its assigned nodes."""
        return self in (Phase.SCHEDULED, Phase.RUNNING)


class ConditionType(StrEnum):
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    RAY_REACHABLE = "RayReachable"
    # A verified job's accepted result was vouched for only by owners later caught lying.
    RESULT_REVOKED = "ResultRevoked"
