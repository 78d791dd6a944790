"""The store's contract on the embedded SQLite store: the same checks DynamoDB Local runs
(tests/dynamo_checks.py), for what both stores promise alike. A conditional write that changed no row
is a conflict, or two daemons would both believe they hold a job and run it twice."""

import pytest

from codsplat.orchestrator.records import SQLiteStore
from dynamo_checks import (test_a_change_from_the_callers_copy_reads_only_when_it_is_stale,  # noqa: F401
                           test_a_stale_write_is_refused, test_concurrent_writers_lose_nothing,
                           test_conditional_create_is_idempotent, test_list_since_reads_only_recent_records,
                           test_transitions_bump_the_version_and_keep_history)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return SQLiteStore(tmp_path_factory.mktemp("store") / "codsplat.db")
