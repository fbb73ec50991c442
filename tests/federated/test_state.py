"""Client states: a round writes the cohort's rows only (model copies in place), and per-client model
copies that would not fit in host memory are refused with one line."""

import numpy as np
import pytest

from fedmoe_jax.errors import ConfigError
from fedmoe_jax.federated.state import ClientStates, check_client_state_memory


def test_put_copies_metadata_and_writes_model_copies_in_place():
    n = 5
    extra = {"w": np.zeros((n, 3), np.float32)}
    states = ClientStates.create(np.ones((n, 2, 4), bool), extra)
    cohort = np.array([3, 1])
    rows = states.take(cohort)
    rows = rows.replace(participations=rows.participations + 1,
                        extra={"w": np.array([[3.0, 3, 3], [1, 1, 1]], np.float32)})
    new = states.put(cohort, rows)
    # metadata: a new array, the old one untouched (FedMoE compares old and new maps / scores)
    assert new.participations.tolist() == [0, 1, 0, 1, 0] and states.participations.tolist() == [0] * 5
    # the [N, ...] model copies: the same buffer, only the cohort's rows written
    assert new.extra["w"] is extra["w"]
    np.testing.assert_array_equal(extra["w"], [[0, 0, 0], [1, 1, 1], [0, 0, 0], [3, 3, 3], [0, 0, 0]])
    assert new.extra_bytes() == n * 3 * 4


def test_client_state_memory_limit_by_hand():
    params = {"a": np.zeros((10, 10)), "b": np.zeros(156)}  # 256 entries: 1 KiB per float32 copy
    # 2 copies x 1 KiB x 1000 clients = 2,048,000 bytes; half of 4 MiB (2,097,152) holds them
    assert check_client_state_memory("scaffold", 2, 1000, params, available=4 * 2**20) == 2_048_000
    with pytest.raises(ConfigError) as e:
        check_client_state_memory("scaffold", 2, 1100, params, available=4 * 2**20)
    msg = str(e.value)
    # at most floor(2,097,152 / 2,048) = 1024 clients
    assert "scaffold keeps 2 model copies" in msg and "use at most 1024 clients" in msg and "\n" not in msg
