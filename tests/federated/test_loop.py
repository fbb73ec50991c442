"""One round: vectorized == sequential per-client reference; sharded == unsharded; no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from test_client import make_batches
from test_submodel import reference_aggregate

from fedmoe_jax.federated import bucket_width, expert_slots, gather_submodel, scatter_submodel
from fedmoe_jax.federated.client import make_local_train
from fedmoe_jax.federated.loop import MemoryCapExceeded, chunk_candidates, make_personal_step, make_round_step
from fedmoe_jax.federated.sharding import make_mesh, pad_clients, padded_cohort_size
from fedmoe_jax.models import SwitchTransformer, get_config

N_CLIENTS, COHORT = 6, 5


@pytest.fixture(scope="module")
def setup():
    config = get_config("switch-tiny-8", dropout_rate=0.1, router_jitter_noise=0.01)
    rng = np.random.default_rng(0)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, 6), jnp.int32),
                                            jnp.ones((1, 4), jnp.int32))["params"]
    maps = np.zeros((N_CLIENTS, config.num_moe_layers, config.num_experts), bool)
    for c in range(N_CLIENTS):
        for layer in range(config.num_moe_layers):
            maps[c, layer, rng.choice(8, rng.integers(1, 5), replace=False)] = True
    batches = [make_batches(rng) for _ in range(N_CLIENTS)]
    return config, params, maps, batches


def cohort_inputs(maps, batches, cohort, width):
    idx, valid = expert_slots(jnp.asarray(maps[cohort]), width)
    stacked = jax.tree.map(lambda *a: np.stack(a), *[batches[c] for c in cohort])
    step_mask = np.ones((len(cohort), 3), bool)
    step_mask[0, 2] = False
    weights = np.arange(1, len(cohort) + 1, dtype=np.float32)
    rngs = np.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(9), c)) for c in cohort])
    return np.asarray(idx), np.asarray(valid), stacked, step_mask, weights, rngs


def sequential_reference(config, params, maps, cohort, inputs, tx):
    idx, valid, batches, step_mask, weights, rngs = inputs
    width = idx.shape[-1]
    local_train = jax.jit(make_local_train(config.replace(num_experts=width), tx))
    trained_full = []
    for i in range(len(cohort)):
        narrow = gather_submodel(params, config, jnp.asarray(idx[i]))
        one = jax.tree.map(lambda a, i=i: a[i], batches)
        trained, _, _ = local_train(narrow, one, jnp.asarray(step_mask[i]), jnp.asarray(valid[i]),
                                    jax.random.wrap_key_data(rngs[i]))
        trained_full.append(scatter_submodel(params, trained, config, jnp.asarray(idx[i]),
                                             jnp.asarray(valid[i])))
    return reference_aggregate(params, trained_full, config, maps[cohort], weights)


def test_vectorized_round_equals_sequential_and_sharded_equals_unsharded(setup):
    config, params, maps, batches = setup
    tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)
    cohort = np.array([0, 2, 3, 4, 5])
    width = bucket_width(int(maps[cohort].sum(-1).max()), config.num_experts)
    inputs = cohort_inputs(maps, batches, cohort, width)
    idx, valid, stacked, step_mask, weights, rngs = inputs
    keys = jax.random.wrap_key_data(jnp.asarray(rngs))

    round_step = make_round_step(config, tx)
    out = round_step(params, idx, valid, stacked, step_mask, weights, keys)
    ref = sequential_reference(config, params, maps, cohort, inputs, tx)
    for key, value in flatten_dict(out.params).items():
        np.testing.assert_allclose(np.asarray(value), ref[key], rtol=1e-4, atol=1e-5, err_msg=str(key))
    assert out.routing.tokens_per_expert.shape == (5, config.num_moe_layers, config.num_experts)
    # statistics land on the experts each client holds, nowhere else
    assert np.all(np.asarray(out.routing.tokens_per_expert)[~maps[cohort]] == 0)

    mesh = make_mesh()
    padded = padded_cohort_size(len(cohort), mesh)
    assert padded == 8
    pad = lambda tree: pad_clients(tree, padded)  # noqa: E731
    sharded_step = make_round_step(config, tx, mesh=mesh)
    out_s = sharded_step(params, pad(idx), pad(valid), pad(stacked), pad(step_mask), pad(weights),
                         jax.random.wrap_key_data(jnp.asarray(pad(rngs))))
    for (key, a), (_, b) in zip(sorted(flatten_dict(out_s.params).items()),
                                sorted(flatten_dict(out.params).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert out_s.metrics["loss"].sharding.spec[0] == "clients"
    np.testing.assert_allclose(np.asarray(out_s.metrics["loss"])[:5], np.asarray(out.metrics["loss"]),
                               rtol=1e-5)


def test_no_recompilation_across_rounds(setup):
    config, params, maps, batches = setup
    round_step = make_round_step(config, optax.sgd(0.1))
    rng = np.random.default_rng(1)
    for r in range(4):
        cohort = np.sort(rng.choice(N_CLIENTS, 3, replace=False))
        new_maps = maps.copy()
        new_maps[cohort[0], 0] = np.roll(new_maps[cohort[0], 0], r)  # expert maps change too
        idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(new_maps, batches, cohort, 4)
        out = round_step(params, idx, valid, stacked, step_mask, weights,
                         jax.random.wrap_key_data(jnp.asarray(rngs)))
        params = out.params
    # one width; on CPU sub-cohorts of 3 (auto chunk)
    [(narrow, chunk, validating)] = list(round_step.compiled)
    assert (narrow.num_experts, chunk, validating) == (4, 3, False)
    assert round_step.compiled[(narrow, chunk, validating)]._cache_size() == 1


def test_auto_chunk_size():
    from fedmoe_jax.federated.loop import CPU_CHUNK, auto_chunk_size
    from fedmoe_jax.federated.sharding import make_mesh

    assert jax.default_backend() == "cpu" and CPU_CHUNK == 4
    assert [auto_chunk_size(c, None) for c in (1, 3, 5, 6, 8, 12)] == [1, 3, 1, 3, 4, 4]
    assert auto_chunk_size(8, make_mesh()) is None  # sharded cohorts are vmapped whole


def test_server_optimizer(setup):
    from fedmoe_jax.federated.loop import make_server_update

    config, params, maps, batches = setup
    round_step = make_round_step(config, optax.sgd(0.1))
    cohort = np.array([1, 3])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    out = round_step(params, idx, valid, stacked, step_mask, weights,
                     jax.random.wrap_key_data(jnp.asarray(rngs)))
    np.testing.assert_array_equal(np.asarray(out.held), maps[cohort].any(0))
    # sgd(1.0) on the pseudo-gradient is plain FedAvg
    aggregate = jax.tree.map(np.asarray, out.params)  # host copy: update() donates its input
    init, update = make_server_update(config, optax.sgd(1.0))
    new, _ = update(params, out.params, out.held, init(params))
    for (key, a), (_, b) in zip(sorted(flatten_dict(new).items()), sorted(flatten_dict(aggregate).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=str(key))
    # with momentum, a second round in which nobody holds an expert must not move it
    init, update = make_server_update(config, optax.sgd(1.0, momentum=0.9))
    state = init(params)
    p1, state = update(params, jax.tree.map(jnp.asarray, aggregate), out.held, state)
    nobody = jnp.zeros_like(out.held)
    p2, _ = update(p1, jax.tree.map(jnp.copy, p1), nobody, state)
    path = ("encoder", "block_1", "mlp", "experts", "wi")
    np.testing.assert_array_equal(np.asarray(flatten_dict(p2)[path]), np.asarray(flatten_dict(p1)[path]))
    dense = ("shared", "embedding")
    assert not np.allclose(np.asarray(flatten_dict(p2)[dense]), np.asarray(flatten_dict(p1)[dense]))


def test_chunked_cohort_equals_whole_cohort(setup):
    config, params, maps, batches = setup
    tx = optax.sgd(0.1, momentum=0.9)
    cohort = np.array([0, 1, 2, 3, 4, 5])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    keys = jax.random.wrap_key_data(jnp.asarray(rngs))
    whole_step = make_round_step(config, tx, chunk_size=None)
    whole = whole_step(params, idx, valid, stacked, step_mask, weights, keys)
    chunked_step = make_round_step(config, tx, chunk_size=2)
    chunked = chunked_step(params, idx, valid, stacked, step_mask, weights, keys)
    for (key, a), (_, b) in zip(sorted(flatten_dict(chunked.params).items()),
                                sorted(flatten_dict(whole.params).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(key))
    np.testing.assert_allclose(np.asarray(chunked.metrics["loss"]), np.asarray(whole.metrics["loss"]),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked.held), np.asarray(whole.held))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        make_round_step(config, tx, chunk_size=4)(params, idx, valid, stacked, step_mask, weights, keys)


def test_chunk_candidates():
    assert chunk_candidates(8, None, 4) == [4, 2, 1]
    assert chunk_candidates(6, None, None) == [None, 3, 2, 1]  # None: the whole cohort at once
    assert chunk_candidates(8, make_mesh(2), None) == [None, 4, 2]  # multiples of the client axis


def test_memory_cap_picks_the_largest_sub_cohort_that_fits(setup):
    """Under a cap the round trains in the largest sub-cohort whose compiled program fits (XLA's
    memory analysis), with the whole cohort's result; below one client's need: MemoryCapExceeded."""
    _, _, maps, batches = setup
    # four programs are compiled here: the 2+2-block switch-tiny-4 compiles in half the time
    config = get_config("switch-tiny-4", dropout_rate=0.1, router_jitter_noise=0.01)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, 6), jnp.int32),
                                            jnp.ones((1, 4), jnp.int32))["params"]
    maps = maps[:, :config.num_moe_layers, :config.num_experts].copy()
    maps[:, :, 0] = True  # every layer keeps >= top_k experts after the cut
    tx = optax.sgd(0.1)
    cohort = np.array([0, 1, 2, 3, 4, 5])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    args = (params, idx, valid, stacked, step_mask, weights, jax.random.wrap_key_data(jnp.asarray(rngs)))
    too_small = make_round_step(config, tx, return_clients=True, memory_cap=1)
    with pytest.raises(MemoryCapExceeded, match=r"sub-cohorts of 1 client.*lower batch_size"):
        too_small(*args)
    [((narrow, c, _), need)] = too_small.memory_needs.items()  # every candidate was compiled and measured
    assert (narrow.num_experts, c) == (4, 6)
    assert list(need) == [3, 2, 1]  # from the CPU default (auto_chunk_size) down
    assert need[3] > need[2] > need[1]  # fewer clients at once, fewer activation bytes
    capped = make_round_step(config, tx, return_clients=True, memory_cap=need[2])
    out = capped(*args)
    assert [(narrow.num_experts, chunk) for narrow, chunk, _ in capped.compiled] == [(4, 2)]
    # the program it chose is the sub-cohorts-of-2 round (which test_chunked_cohort_equals_whole_cohort
    # checks against the whole cohort); the same program, so the compilation cache serves it
    halves = make_round_step(config, tx, chunk_size=2, return_clients=True)(*args)
    for a, b in zip(jax.tree.leaves((out.params, out.metrics, out.client_params)),
                    jax.tree.leaves((halves.params, halves.metrics, halves.client_params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_personal_step_chunked_and_capped_equal_each_client_alone(setup):
    """Local training without a server (method `local`): the vmapped cohort, sub-cohorts of 2 and the
    program a memory cap picks all equal each client's own model trained alone; below one client's
    need: MemoryCapExceeded naming local training."""
    _, _, _, batches = setup
    config = get_config("switch-tiny-4", dropout_rate=0.1, router_jitter_noise=0.01)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, 6), jnp.int32),
                                            jnp.ones((1, 4), jnp.int32))["params"]
    c = 4  # every client its own full model: the global one scaled differently per client
    own = jax.tree.map(lambda a: np.stack([np.asarray(a) * (1 + 0.05 * i) for i in range(c)]), params)
    stacked = jax.tree.map(lambda *a: np.stack(a), *batches[:c])
    step_mask = np.ones((c, 3), bool)
    step_mask[1, 2] = False
    keys = jax.random.wrap_key_data(jnp.stack(
        [jax.random.key_data(jax.random.fold_in(jax.random.key(3), i)) for i in range(c)]))
    tx = optax.sgd(0.1, momentum=0.9)
    args = (own, stacked, step_mask, keys)

    local_train = jax.jit(make_local_train(config, tx))  # the slow obvious reference: one client at a time
    all_experts = jnp.ones((config.num_moe_layers, config.num_experts), bool)
    alone = [local_train(jax.tree.map(lambda a, i=i: a[i], own), jax.tree.map(lambda a, i=i: a[i], stacked),
                         jnp.asarray(step_mask[i]), all_experts, keys[i]) for i in range(c)]
    whole = make_personal_step(config, tx, chunk_size=None)(*args)
    halves = make_personal_step(config, tx, chunk_size=2)(*args)
    for out in (whole, halves):
        for i in range(c):
            for a, b in zip(jax.tree.leaves(alone[i][0]), jax.tree.leaves(out[0])):
                np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(out[1]["loss"][i]), float(alone[i][1]["loss"]), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(out[1]["finite"]), np.ones(c))

    too_small = make_personal_step(config, tx, memory_cap=1)
    with pytest.raises(MemoryCapExceeded, match=r"^local training needs .* of 1 client.*batch_size"):
        too_small(*args)
    need = too_small.memory_needs[c]
    assert list(need) == [None, 2, 1] and need[None] > need[2] > need[1]  # None: all 4 at once
    capped = make_personal_step(config, tx, memory_cap=need[2])
    out = capped(*args)
    assert list(capped.memory_needs[c]) == [None, 2]  # all at once did not fit, halves did
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(halves)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_parallel_mesh_equals_unsharded(setup):
    from fedmoe_jax.federated.sharding import place_params

    config, params, maps, batches = setup
    tx = optax.sgd(0.1)
    cohort = np.array([0, 1, 2, 3])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    keys = jax.random.wrap_key_data(jnp.asarray(rngs))
    plain = make_round_step(config, tx)(params, idx, valid, stacked, step_mask, weights, keys)
    mesh = make_mesh(experts=2)  # 4 clients x 2 expert shards
    assert dict(mesh.shape) == {"clients": 4, "experts": 2}
    placed = place_params(params, config, mesh)
    out = make_round_step(config, tx, mesh=mesh)(placed, idx, valid, stacked, step_mask, weights, keys)
    wi = flatten_dict(out.params)[("encoder", "block_1", "mlp", "experts", "wi")]
    assert wi.sharding.spec[0] == "experts"
    assert {s.index[0].start for s in wi.addressable_shards} == {0, 4}  # two halves of 8 experts
    for (key, a), (_, b) in zip(sorted(flatten_dict(out.params).items()),
                                sorted(flatten_dict(plain.params).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_validation_inside_the_round_equals_validating_the_returned_clients(setup):
    """The fast path (each sub-cohort's trained sub-MoEs validated inside the round, none returned)
    against the slow one (the round returns every trained sub-MoE, `make_cohort_eval` validates them),
    both decoding with beam search and a length penalty per client's task (greedy is the default every
    other round test runs); and the slow obvious path: `beam_search` of each trained client alone."""
    from fedmoe_jax.federated.evaluate import make_cohort_eval
    from fedmoe_jax.federated.submodel import narrow_config
    from fedmoe_jax.models.decoding import Decoding, beam_search
    from fedmoe_jax.models.objective import batch_masks

    config, params, maps, batches = setup
    tx = optax.sgd(0.1)
    cohort = np.array([0, 1, 2, 3])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    keys = jax.random.wrap_key_data(jnp.asarray(rngs))
    rng = np.random.default_rng(5)
    eval_batches = jax.tree.map(lambda *a: np.stack(a), *[make_batches(rng, k=2) for _ in cohort])
    tasks = np.array([2, 0, 1, 2])  # each client searched with its task's length penalty
    eval_batches["task"] = np.broadcast_to(tasks[:, None, None], eval_batches["example_mask"].shape)
    penalties = (0.0, 1.0, 2.0)
    beams = Decoding(num_beams=3, length_penalty=penalties)
    fast = make_round_step(config, tx, chunk_size=2, eval_max_length=4, decoding=beams)(
        params, idx, valid, stacked, step_mask, weights, keys, None, eval_batches)
    assert fast.client_params is None
    slow = make_round_step(config, tx, chunk_size=2, return_clients=True)(
        params, idx, valid, stacked, step_mask, weights, keys)
    narrow = narrow_config(config, valid)
    loss, stats, tokens = make_cohort_eval(narrow, 4, decoding=beams)(slow.client_params, eval_batches, valid)
    np.testing.assert_allclose(np.asarray(fast.evaluation[0]), np.asarray(loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast.evaluation[1].tokens_per_expert),
                                  np.asarray(stats.tokens_per_expert))
    np.testing.assert_array_equal(np.asarray(fast.evaluation[2]), np.asarray(tokens))
    tokens = np.asarray(tokens)
    assert tokens.shape == (4, 2, eval_batches["inputs"].shape[2], 4)
    model = SwitchTransformer(narrow)
    for i in (0, 1):
        client = jax.tree.map(lambda a, i=i: a[i], slow.client_params)
        batch = jax.tree.map(lambda a, i=i: a[i, 0], eval_batches)
        want = beam_search(model, client, batch["inputs"], batch_masks(batch)[0], num_beams=3, max_length=4,
                           length_penalty=penalties[tasks[i]], expert_mask=jnp.asarray(valid[i]))
        np.testing.assert_array_equal(tokens[i, 0], np.asarray(want.tokens))
    greedy = np.asarray(make_cohort_eval(narrow, 4)(slow.client_params, eval_batches, valid)[2])
    assert not np.array_equal(greedy, tokens)  # the beams found other outputs somewhere
    with pytest.raises(ValueError, match="eval_max_length"):
        make_round_step(config, tx, chunk_size=2)(params, idx, valid, stacked, step_mask, weights, keys, None,
                                                 eval_batches)


def test_evaluation_program_equals_the_round_and_fits_the_memory_cap(setup):
    """`round_step.evaluate` (gather + validate, no training) equals a round's validation of untrained
    sub-MoEs (all steps masked); under a cap it picks the largest sub-cohort that fits, same outputs."""
    config, params, maps, batches = setup
    tx = optax.sgd(0.1)
    cohort = np.array([0, 1, 2, 3])
    idx, valid, stacked, step_mask, weights, rngs = cohort_inputs(maps, batches, cohort, 4)
    rng = np.random.default_rng(6)
    eval_batches = jax.tree.map(lambda *a: np.stack(a), *[make_batches(rng, k=2) for _ in cohort])
    step = make_round_step(config, tx, chunk_size=2, eval_max_length=4)
    untrained = step(params, idx, valid, stacked, np.zeros_like(step_mask), np.zeros_like(weights),
                     jax.random.wrap_key_data(jnp.asarray(rngs)), None, eval_batches).evaluation
    alone = step.evaluate(params, idx, valid, eval_batches)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(untrained)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    too_small = make_round_step(config, tx, eval_max_length=4, memory_cap=1)
    with pytest.raises(MemoryCapExceeded, match="an evaluation"):
        too_small.evaluate(params, idx, valid, eval_batches)
    [need] = too_small.memory_needs.values()
    assert list(need)[-1] == 1 and need[list(need)[0]] > need[1]  # more clients at once, more bytes
    capped = make_round_step(config, tx, eval_max_length=4, memory_cap=need[1])
    out = capped.evaluate(params, idx, valid, eval_batches)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(alone)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
