"""Status rules: conditions, transition times, phases, and the retry delay."""

from __future__ import annotations

from imhub.operator import handlers, status

OK = [status.Outcome(c, True, "Fine", "") for c in status.COMPONENTS]


def _with(component: str, ok: bool, reason: str = "Down") -> list[status.Outcome]:
    return [
        status.Outcome(o.type, ok, reason, "backend down") if o.type == component else o for o in OK
    ]


def test_first_pass_all_ok_is_ready() -> None:
    got = status.build_status(
        None, OK, generation=1, endpoints={"gateway": "http://g"}, resources={}, now="T1"
    )
    assert got["phase"] == "Ready"
    assert got["observedGeneration"] == 1
    types = [c["type"] for c in got["conditions"]]
    assert types == [*status.COMPONENTS, "Ready"]
    ready = status.condition(got["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"
    assert all(c["lastTransitionTime"] == "T1" for c in got["conditions"])


def test_first_pass_with_a_failure_is_provisioning() -> None:
    got = status.build_status(
        None, _with("Database", False), generation=1, endpoints={}, resources={}, now="T1"
    )
    assert got["phase"] == "Provisioning"
    ready = status.condition(got["conditions"], "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "Down")
    assert "Database" in ready["message"]


def test_transition_time_moves_only_on_a_flip() -> None:
    first = status.build_status(None, OK, generation=1, endpoints={}, resources={}, now="T1")
    same = status.build_status(first, OK, generation=2, endpoints={}, resources={}, now="T2")
    assert all(c["lastTransitionTime"] == "T1" for c in same["conditions"])
    assert same["observedGeneration"] == 2

    broken = status.build_status(
        same, _with("Topics", False), generation=2, endpoints={}, resources={}, now="T3"
    )
    assert broken["phase"] == "Degraded"
    by_type = {c["type"]: c for c in broken["conditions"]}
    assert by_type["Topics"]["lastTransitionTime"] == "T3"
    assert by_type["Ready"]["lastTransitionTime"] == "T3"
    assert by_type["Database"]["lastTransitionTime"] == "T1"

    healed = status.build_status(broken, OK, generation=2, endpoints={}, resources={}, now="T4")
    assert healed["phase"] == "Ready"
    assert {c["type"]: c["lastTransitionTime"] for c in healed["conditions"]}["Topics"] == "T4"


def test_conditions_carry_reason_message_and_generation() -> None:
    got = status.build_status(
        None,
        _with("Storage", False, "StorageUnavailable"),
        generation=7,
        endpoints={},
        resources={},
        now="T",
    )
    storage = status.condition(got["conditions"], "Storage")
    assert storage is not None
    assert storage == {
        "type": "Storage",
        "status": "False",
        "reason": "StorageUnavailable",
        "message": "backend down",
        "lastTransitionTime": "T",
        "observedGeneration": 7,
    }


def test_backoff_grows_and_is_capped() -> None:
    delays = [handlers.backoff(n, 10) for n in range(8)]
    assert delays[:4] == [10, 20, 40, 80]
    assert max(delays) == 300
    assert delays == sorted(delays)
