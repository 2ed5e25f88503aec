"""`training.distributed.process_group`: flags, `JAX_*` variables and their errors."""

import pytest

from training.distributed import DistributedError, ProcessGroup, process_group


def test_one_process_without_settings():
    assert process_group(environ={}) == ProcessGroup()
    assert process_group(num_processes=1, process_id=0, environ={}).is_chief


def test_flags_then_environment():
    group = process_group("10.0.0.1:1234", 4, 3, 20, environ={})
    assert group == ProcessGroup("10.0.0.1:1234", 4, 3, 20)
    assert group.multi_process and not group.is_chief
    environ = {
        "JAX_COORDINATOR_ADDRESS": "host:99",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    assert process_group(environ=environ) == ProcessGroup("host:99", 2, 1)
    # A flag wins over its variable.
    assert process_group(process_id=0, environ=environ).process_id == 0


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (("host:1", 2, None), {}, "missing --process-id"),
        ((None, 2, 0), {}, "missing --coordinator"),
        (("host", 2, 0), {}, "HOST:PORT, got 'host'"),
        (("host:1", 2, 2), {}, "in 0..1 for --num-processes 2, got 2"),
        (("host:1", 0, 0), {}, "--num-processes must be >= 1, got 0"),
        (("host:1", 2, 0, 0), {}, "--heartbeat-timeout must be >= 1 second, got 0"),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"},
            "JAX_NUM_PROCESSES must be an integer, got 'two'",
        ),
    ],
)
def test_errors_name_the_setting_and_value(args, environ, message):
    with pytest.raises(DistributedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        process_group(*args, environ=environ)
