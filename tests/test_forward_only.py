"""The forward-only marker: the identity everywhere except a transpose, which raises ours."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopgrad_jax._forward_only import forward_only, forward_only_p

MESSAGE = "no reverse mode here: use scan"


def marked(x):
    return jnp.sin(forward_only(x * x, MESSAGE)).sum()


def test_this_jax_has_the_extension_points():
    # Without them the library falls back to JAX's own error; the suite must notice.
    assert forward_only_p is not None


def test_identity_under_eval_jit_and_vmap():
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    tree = {"a": x, "n": jnp.arange(3)}
    out = forward_only(tree, MESSAGE)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    np.testing.assert_array_equal(out["a"], x)
    assert out["n"].dtype == tree["n"].dtype  # integer leaves carry no tangent: untouched
    np.testing.assert_array_equal(jax.jit(forward_only, static_argnums=1)(x, MESSAGE), x)
    np.testing.assert_array_equal(jax.vmap(lambda r: forward_only(r, MESSAGE))(x), x)


def test_forward_mode_passes_tangents_through():
    x = jnp.array([0.3, -1.2, 2.0])
    expected = jnp.diag(jnp.cos(x * x) * 2 * x)  # d/dx sin(x^2), elementwise
    for transform in (jax.jacfwd, lambda f: jax.jit(jax.jacfwd(f))):
        np.testing.assert_allclose(
            transform(lambda x: jnp.sin(forward_only(x * x, MESSAGE)))(x), expected, rtol=1e-12
        )
    hessian = jax.jacfwd(jax.jacfwd(marked))(x)  # forward over forward
    np.testing.assert_allclose(hessian, jax.hessian(lambda x: jnp.sin(x * x).sum())(x), 1e-12)


@pytest.mark.parametrize(
    "reverse",
    [
        jax.grad,
        lambda f: jax.jit(jax.grad(f)),
        lambda f: lambda x: jax.vjp(f, x)[1](jnp.float64(1.0)),
        lambda f: jax.vmap(jax.grad(f)),
    ],
    ids=["grad", "jit_grad", "vjp", "vmap_grad"],
)
def test_reverse_mode_raises_the_message(reverse):
    # Anchored at the start only: JAX may append a note about its filtered traceback.
    with pytest.raises(ValueError, match=f"^{MESSAGE}"):
        reverse(marked)(jnp.ones((2, 3)))


def test_output_that_misses_the_loss_does_not_raise():
    # Marking a value the loss does not read leaves jax.grad of the loss working.
    def f(x):
        unused = forward_only(x, MESSAGE)
        del unused
        return jnp.sum(x**2)

    np.testing.assert_allclose(jax.grad(f)(jnp.arange(3.0)), 2 * jnp.arange(3.0))


def test_compiles_to_nothing():
    def hlo(f):
        return jax.jit(f).lower(jnp.ones(4)).compile().as_text()

    marked_hlo = hlo(lambda x: forward_only(x, MESSAGE) * 2)
    assert "loopgrad" not in marked_hlo
    assert len(marked_hlo.splitlines()) == len(hlo(lambda x: x * 2).splitlines())
