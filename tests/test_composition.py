"""rmsprop_jax inside optax's combinators: chains, masks, accumulation, guards, injection.

Each test runs a jitted training loop on a small two-layer parameter tree (``helpers``)
and checks the combinator's contract: against the float64 reference loop of ``helpers``
where arithmetic is involved, and bit for bit where the combinator only
routes, skips or holds values within one run. Two *different* compiled programs
(a combinator's and a bare transform's) may fuse the same float32 arithmetic
differently, so comparisons across programs allow an ulp or two.

``optax.apply_if_finite`` and ``optax.inject_hyperparams`` are also run on one array
against the float64 reference with per-step hyperparameters (``helpers.reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    ATOL,
    RMSPROP_CONFIGS,
    RTOL,
    TREE_SHAPES,
    TREE_STEPS,
    ULPS,
    ReferenceRmsprop,
    in_rms_state,
    reference,
    scan_updates,
    small_gradients,
    to_f64,
    train,
    tree_grads,
    tree_params,
)

import rmsprop_jax

# The centered variance cancels: float32 rounding differences of one ulp (e.g. whether XLA
# fuses a multiply-add into an FMA, which changes with the surrounding fusion) come out
# amplified in the parameters after 12 steps with momentum. Measured worst relative
# difference from the float64 loop: 1.5e-5 to 2.8e-5 depending on the fusion.
RTOL_CENTERED = 5e-5


def is_bias(path: tuple, leaf) -> bool:
    del leaf
    return path[-1].key == "b"


def labels(params, names=("rms", "sgd")):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: names[1] if is_bias(path, leaf) else names[0], params
    )


def weights_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: not is_bias(p, x), params)


def biases_mask(params):
    return jax.tree_util.tree_map_with_path(is_bias, params)


# ------------------------------- float64 counterparts of clipping and weight decay


def np_clip_by_global_norm(grads, max_norm: float):
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in jax.tree.leaves(grads)))
    return grads if norm < max_norm else jax.tree.map(lambda g: g * (max_norm / norm), grads)


def np_add_decayed_weights(updates, params, weight_decay: float):
    return jax.tree.map(lambda u, p: u + weight_decay * p, updates, params)


# ---------------------------------------------------------------- optax.chain


@pytest.mark.parametrize("rms", list(RMSPROP_CONFIGS))
@pytest.mark.parametrize("placement", ["coupled", "decoupled"])
def test_chain_with_clipping_and_weight_decay_matches_float64_reference(rms, placement):
    config = RMSPROP_CONFIGS[rms]
    lr, decay, max_norm, wd = 0.05, 0.9, 5.0, 0.1
    clip, weight_decay = optax.clip_by_global_norm(max_norm), optax.add_decayed_weights(wd)
    params, grads = tree_params(), tree_grads(seed=1)
    if placement == "coupled":  # L2 added to the gradient before the scaling
        tx = optax.chain(clip, weight_decay, rmsprop_jax.rmsprop(lr, decay, **config))
        ref = ReferenceRmsprop(params, **config)
    else:  # AdamW-style: decay added to the scaled update, under the learning rate
        scaling_config = {k: v for k, v in config.items() if k not in ("momentum", "centered")}
        centered = config.get("centered", False)
        scaling = rmsprop_jax.scale_by_centered_rms if centered else rmsprop_jax.scale_by_rms
        tx = optax.chain(
            clip, scaling(decay, **scaling_config), weight_decay, optax.scale_by_learning_rate(lr)
        )
        ref = ReferenceRmsprop(params, centered=centered, **scaling_config)
    trajectory, _, _ = train(tx, params, grads)

    p = to_f64(params)
    clipped_steps = 0
    for g, ours in zip(grads, trajectory):
        g = to_f64(g)
        clipped = np_clip_by_global_norm(g, max_norm)
        clipped_steps += clipped is not g
        if placement == "coupled":
            u = ref.step(np_add_decayed_weights(clipped, p, wd), learning_rate=lr, decay=decay)
        else:
            v = ref.scale(clipped, decay=decay)
            u = jax.tree.map(lambda x: -lr * x, np_add_decayed_weights(v, p, wd))
        p = jax.tree.map(np.add, p, u)
        rtol = RTOL_CENTERED if config.get("centered") else RTOL
        chex.assert_trees_all_close(ours, p, rtol=rtol, atol=ATOL)
    assert 0 < clipped_steps < TREE_STEPS, "the gradients should exercise both sides of the clip"


def test_chain_matches_the_same_chain_built_on_optax_rmsprop():
    def chain(rms):
        return optax.chain(optax.clip_by_global_norm(5.0), optax.add_decayed_weights(0.1), rms)

    params, grads = tree_params(), tree_grads(seed=2)
    config = dict(learning_rate=0.05, decay=0.95, centered=True, momentum=0.5, eps=1e-6)
    ours, _, _ = train(chain(rmsprop_jax.rmsprop(**config)), params, grads)
    theirs, _, _ = train(chain(optax.rmsprop(**config)), params, grads)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rms", list(RMSPROP_CONFIGS))
def test_flatten_packs_the_state_into_one_buffer_with_the_same_trajectory(rms):
    # optax.flatten is the packing opt-in for trees of many small leaves (see the README's
    # Performance section): one contiguous buffer per state field, same arithmetic.
    params, grads = tree_params(), tree_grads(seed=5)
    tx = rmsprop_jax.rmsprop(0.05, **RMSPROP_CONFIGS[rms])
    packed = optax.flatten(tx)
    nu = optax.tree_utils.tree_get(packed.init(params), "nu")
    assert len(jax.tree.leaves(nu)) == 1
    assert nu.shape == (
        sum(math.prod(s) for layer in TREE_SHAPES.values() for s in layer.values()),
    )
    ours, _, _ = train(tx, params, grads)
    flat, _, _ = train(packed, params, grads)
    chex.assert_trees_all_close(flat, ours, **ULPS)


# ------------------------------------------------- optax.masked / multi_transform


def test_masked_rmsprop_on_weights_sgd_on_biases():
    lr_w, lr_b = 0.05, 0.3
    tx = optax.chain(
        optax.masked(rmsprop_jax.rmsprop(lr_w, centered=True, momentum=0.9), weights_mask),
        optax.masked(optax.sgd(lr_b), biases_mask),
    )
    params, grads = tree_params(), tree_grads(seed=3)
    _, states, updates = train(tx, params, grads)

    for g, u in zip(grads, updates):
        # Biases get exactly SGD's update, untouched by RMSProp.
        for layer in TREE_SHAPES:
            chex.assert_trees_all_equal(u[layer]["b"], -lr_b * g[layer]["b"])
    # Weights get what rmsprop_jax gives when it sees the weights alone.
    only_weights = lambda tree: {layer: {"w": tree[layer]["w"]} for layer in TREE_SHAPES}  # noqa: E731
    _, alone_states, alone = train(
        rmsprop_jax.rmsprop(lr_w, centered=True, momentum=0.9),
        only_weights(params),
        [only_weights(g) for g in grads],
    )
    chex.assert_trees_all_close([only_weights(u) for u in updates], alone, **ULPS)
    # The masked state holds moments for the weights only.
    nu = optax.tree_utils.tree_get(states[-1], "nu")
    for layer in TREE_SHAPES:
        assert isinstance(nu[layer]["b"], optax.MaskedNode)
        chex.assert_trees_all_close(nu[layer]["w"], alone_states[-1][0].nu[layer]["w"], **ULPS)


def test_multi_transform_rmsprop_on_weights_sgd_on_biases():
    lr_w, lr_b = 0.05, 0.3
    tx = optax.multi_transform(
        {"rms": rmsprop_jax.rmsprop(lr_w, bias_correction=True), "sgd": optax.sgd(lr_b)},
        labels,
    )
    params, grads = tree_params(), tree_grads(seed=4)
    trajectory, _, updates = train(tx, params, grads)

    for g, u in zip(grads, updates):
        for layer in TREE_SHAPES:
            chex.assert_trees_all_equal(u[layer]["b"], -lr_b * g[layer]["b"])

    # Each group follows the trajectory of its transform run on that group alone.
    for key, alone_tx in [
        ("w", rmsprop_jax.rmsprop(lr_w, bias_correction=True)),
        ("b", optax.sgd(lr_b)),
    ]:
        group = lambda tree, key=key: {layer: tree[layer][key] for layer in TREE_SHAPES}  # noqa: E731
        alone_trajectory, _, alone = train(alone_tx, group(params), [group(g) for g in grads])
        chex.assert_trees_all_close([group(u) for u in updates], alone, **ULPS)
        chex.assert_trees_all_close([group(p) for p in trajectory], alone_trajectory, **ULPS)


# ----------------------------------------------------------- optax.MultiSteps


@jax.jit
def _running_mean_step(acc, grads, n):
    # (g - acc) / (n + 1) with an int32 n: standard promotion, as in optax.MultiSteps.
    with jax.numpy_dtype_promotion("standard"):
        return jax.tree.map(lambda a, g: a + (g - a) / (n + 1), acc, grads)


def running_mean(grads: Sequence):
    """The running mean ``acc + (g - acc) / (n + 1)`` in float32 that optax.MultiSteps keeps."""
    acc = jax.tree.map(jnp.zeros_like, grads[0])
    for n, g in enumerate(grads):
        acc = _running_mean_step(acc, g, jnp.asarray(n, jnp.int32))
    exact = jax.tree.map(lambda *g: np.mean(np.stack(g).astype(np.float64), 0), *grads)
    chex.assert_trees_all_close(acc, exact, rtol=1e-6, atol=1e-7)
    return acc


@pytest.mark.parametrize("rms", list(RMSPROP_CONFIGS))
def test_multi_steps_k_micro_steps_equal_one_step_on_the_mean_gradient(rms):
    k, outer_steps = 4, 3
    inner = rmsprop_jax.rmsprop(0.05, **RMSPROP_CONFIGS[rms])
    accumulating = optax.MultiSteps(inner, every_k_schedule=k)
    params, grads = tree_params(), tree_grads(seed=5, steps=k * outer_steps)
    # optax.MultiSteps mixes its int32 micro-step counter with float32 and bool values,
    # promotions that strict mode refuses (optax's code, not this library's).
    with jax.numpy_dtype_promotion("standard"):
        trajectory, states, _ = train(accumulating.gradient_transformation(), params, grads)

    # Centered RMSProp amplifies a one-ulp change of the gradient, so the mean is
    # computed with the same arithmetic as optax's accumulator (and checked against
    # the float64 mean).
    means = [running_mean(grads[i : i + k]) for i in range(0, len(grads), k)]
    expected, _, _ = train(inner, params, means)
    for i, (p, state) in enumerate(zip(trajectory, states)):
        done, micro = divmod(i + 1, k)
        if micro:  # mid-accumulation: the parameters have not moved since the last outer step
            chex.assert_trees_all_equal(p, trajectory[done * k - 1] if done else params)
            assert not bool(accumulating.has_updated(state))
        else:
            # The inner step runs inside MultiSteps' conditional, a different XLA program
            # with its own fusions: one-ulp differences, amplified by the centered
            # variance's cancellation (see RTOL_CENTERED; measured 2.5e-6).
            tolerance = dict(rtol=1e-5, atol=1e-7) if "centered" in rms else ULPS
            chex.assert_trees_all_close(p, expected[done - 1], **tolerance)
            assert bool(accumulating.has_updated(state))
    count = optax.tree_utils.tree_get(states[-1].inner_opt_state, "count", filtering=in_rms_state)
    assert int(count) == outer_steps


# ------------------------------------------------------- optax.apply_if_finite


def test_apply_if_finite_skips_a_nan_step_and_training_continues():
    make = lambda: rmsprop_jax.rmsprop(  # noqa: E731
        0.05, centered=True, momentum=0.9, bias_correction=True
    )
    tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
    params, grads = tree_params(), tree_grads(seed=6, steps=8)
    bad = 3
    grads[bad] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[bad])
    trajectory, states, updates = train(tx, params, grads)

    assert not bool(states[bad].last_finite)
    assert int(states[bad].notfinite_count) == 1
    chex.assert_trees_all_equal(updates[bad], jax.tree.map(jnp.zeros_like, updates[bad]))
    chex.assert_trees_all_equal(states[bad].inner_state, states[bad - 1].inner_state)
    chex.assert_trees_all_equal(trajectory[bad], trajectory[bad - 1])
    # Afterwards training goes on as if the bad step had never been taken.
    assert int(states[-1].notfinite_count) == 0 and int(states[-1].total_notfinite) == 1
    chex.assert_tree_all_finite(trajectory[-1])
    expected, _, _ = train(make(), params, grads[:bad] + grads[bad + 1 :])
    chex.assert_trees_all_close(trajectory[:bad] + trajectory[bad + 1 :], expected, **ULPS)


@pytest.mark.parametrize("centered", [False, True])
def test_apply_if_finite_skips_the_step_and_training_continues(centered):
    inner = rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=centered, bias_correction=True)
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    rng = np.random.default_rng(0)
    finite = [jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(4)]
    bad = finite[0].at[2].set(jnp.nan)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(5))
    seen = []
    for g in [finite[0], finite[1], bad, bad.at[0].set(jnp.inf), finite[2], finite[3]]:
        before = state.inner_state
        u, state = update(g, state)
        if not bool(jnp.all(jnp.isfinite(g))):
            chex.assert_trees_all_equal(state.inner_state, before)  # untouched
            chex.assert_trees_all_equal(u, jnp.zeros(5))
        seen.append(u)
    assert int(state.total_notfinite) == 2 and int(state.notfinite_count) == 0
    # The finite steps equal the inner optimizer run on the finite gradients alone.
    inner_state = inner.init(jnp.zeros(5))
    expected = []
    for g in finite:
        u, inner_state = jax.jit(inner.update)(g, inner_state)
        expected.append(u)
    chex.assert_trees_all_close([seen[i] for i in (0, 1, 4, 5)], expected, rtol=1e-6)
    chex.assert_tree_all_finite(state)


# -------------------------------------------------- optax.inject_hyperparams


@pytest.mark.parametrize("rms", list(RMSPROP_CONFIGS))
def test_inject_hyperparams_changes_between_jitted_steps_take_effect(rms):
    config = RMSPROP_CONFIGS[rms]
    static = {k: v for k, v in config.items() if isinstance(v, bool)}
    numeric = {k: v for k, v in config.items() if not isinstance(v, bool)}
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=0.05, decay=0.9, **static, **numeric
    )
    # (learning rate, decay) at each step; both change mid-run, one of the decays is 0.
    schedule = [(0.05, 0.9)] * 3 + [(0.01, 0.9)] * 2 + [(0.01, 0.5)] * 2 + [(0.1, 0.0), (0.1, 0.99)]
    params, grads = tree_params(), tree_grads(seed=7, steps=len(schedule))

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    ref, p = ReferenceRmsprop(params, **config), to_f64(params)
    for g, (lr, decay) in zip(grads, schedule):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        state.hyperparams["decay"] = jnp.asarray(decay, jnp.float32)
        params, state = step(params, state, g)
        # The reference decays with the float32 value the library sees, and corrects the
        # bias with the product of the decays actually applied.
        u = ref.step(to_f64(g), learning_rate=float(np.float32(lr)), decay=float(np.float32(decay)))
        p = jax.tree.map(np.add, p, u)
        chex.assert_trees_all_close(params, p, rtol=RTOL, atol=ATOL)
    assert int(optax.tree_utils.tree_get(state.inner_state, "count", filtering=in_rms_state)) == (
        len(schedule)
    )


INJECTED = dict(learning_rate=0.1, decay=0.9, eps=1e-3, momentum=0.5, initial_scale=0.5)
FLAGS = dict(bias_correction=True, nesterov=True)


def test_injected_hyperparameters_match_the_plain_optimizer():
    g = small_gradients(8, seed=4)
    plain = rmsprop_jax.rmsprop(**INJECTED, **FLAGS)
    injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    run = jax.jit(scan_updates, static_argnums=0)
    expected, _ = run(plain, jnp.zeros(6), g)
    got, states = run(injected, jnp.zeros(6), g)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-9)
    assert set(states.hyperparams) == set(INJECTED)


@pytest.mark.parametrize(
    "name,new_value",
    [("learning_rate", 0.02), ("decay", 0.5), ("eps", 1e-6), ("momentum", 0.9)],
)
def test_injected_hyperparameter_change_takes_effect(name, new_value):
    # Changed after 3 jitted steps; float64 reference with the per-step values.
    steps, change = 7, 3
    g = small_gradients(steps, seed=5)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    state = tx.init(jnp.zeros(6))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    got = []
    for t in range(steps):
        if t == change:
            state.hyperparams[name] = jnp.asarray(new_value, jnp.float32)
        u, state = step(jnp.asarray(g[t]), state)
        got.append(u)
    schedule = {k: [v] * steps for k, v in INJECTED.items() if k != "initial_scale"}
    schedule[name] = [INJECTED[name]] * change + [new_value] * (steps - change)
    ref = reference(list(g), initial_scale=INJECTED["initial_scale"], **schedule, **FLAGS)
    np.testing.assert_allclose(np.asarray(got), ref["updates"], rtol=2e-5, atol=1e-9)
    unchanged = reference(list(g), **INJECTED, **FLAGS)
    assert not np.allclose(np.asarray(got)[change:], np.asarray(unchanged["updates"])[change:])


def test_injected_initial_scale_is_read_at_init_only():
    # initial_scale sets nu_0 (reference: nu starts at it); changing it after init
    # changes nothing, since nu already holds it.
    g = small_gradients(4, seed=6)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**INJECTED, **FLAGS)
    step = jax.jit(tx.update)
    state = tx.init(jnp.zeros(6))
    np.testing.assert_allclose(np.asarray(state.inner_state[0].nu), 0.5)
    other = tx.init(jnp.zeros(6))
    other.hyperparams["initial_scale"] = jnp.asarray(3.0, jnp.float32)
    for t in range(4):
        u, state = step(jnp.asarray(g[t]), state)
        v, other = step(jnp.asarray(g[t]), other)
        chex.assert_trees_all_equal(u, v)
    ref = reference(list(g), **INJECTED, **FLAGS)
    np.testing.assert_allclose(np.asarray(u), ref["updates"][-1], rtol=2e-5)


def test_injected_decay_changes_between_jitted_steps_use_the_product():
    decays = [0.9, 0.9, 0.5, 0.5, 0.99, 0.0, 0.7]
    g = small_gradients(len(decays), seed=2)
    tx = optax.inject_hyperparams(rmsprop_jax.scale_by_centered_rms)(
        decay=0.9, eps=1e-8, bias_correction=True
    )
    state = tx.init(jnp.zeros(6))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    got = []
    for t, rho in enumerate(decays):
        state.hyperparams["decay"] = jnp.asarray(rho, jnp.float32)
        u, state = step(jnp.asarray(g[t]), state)
        got.append(u)
    ref = reference(list(g), decay=decays, eps=1e-8, centered=True, bias_correction=True)
    np.testing.assert_allclose(
        float(state.inner_state.total_weight), 1 - ref["product"][-1], rtol=1e-6
    )
    kappa = np.max(ref["condition"])
    np.testing.assert_allclose(np.asarray(got), ref["updates"], rtol=1e-5 + 1e-6 * kappa)


# ---------------------------------------------------- optax.tree_utils.tree_get


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: rmsprop_jax.rmsprop(0.1),
        lambda: rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9),
        lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop)(0.1, centered=True),
        lambda: optax.chain(rmsprop_jax.scale_by_centered_rms(), optax.scale_by_learning_rate(0.1)),
    ],
    ids=["plain", "centered_momentum", "injected_centered", "scaling_in_chain"],
)
def test_tree_get_finds_the_moments(make_tx: Callable[[], optax.GradientTransformation]):
    tx = make_tx()
    params, grads = tree_params(), tree_grads(seed=8, steps=3)
    _, states, _ = train(tx, params, grads)
    state = states[-1]

    nu = optax.tree_utils.tree_get(state, "nu")
    chex.assert_trees_all_equal_shapes_and_dtypes(nu, params)
    g = [to_f64(x) for x in grads]
    expected_nu = jax.tree.map(lambda a, b, c: 0.081 * a**2 + 0.09 * b**2 + 0.1 * c**2, *g)
    chex.assert_trees_all_close(nu, expected_nu, rtol=1e-5)
    mu = optax.tree_utils.tree_get(state, "mu")
    centered = any(
        isinstance(s, rmsprop_jax.ScaleByCenteredRmsState)
        for s in jax.tree.leaves(
            state, is_leaf=lambda s: isinstance(s, rmsprop_jax.ScaleByCenteredRmsState)
        )
    )
    if centered:
        expected_mu = jax.tree.map(lambda a, b, c: 0.081 * a + 0.09 * b + 0.1 * c, *g)
        chex.assert_trees_all_close(mu, expected_mu, rtol=1e-5, atol=1e-6)
    else:
        assert mu is None
    assert int(optax.tree_utils.tree_get(state, "count", filtering=in_rms_state)) == 3
