import pytest

from core.registry import Registry, RegistryError


def test_register_get_build():
    reg = Registry("widget")

    @reg.register("double")
    def double(x, k=2):
        return x * k

    reg.register("triple", lambda x: 3 * x)
    assert reg.get("double") is double
    assert reg.build("double", 4, k=3) == 12
    assert reg.names() == ["double", "triple"]
    assert "triple" in reg and "nope" not in reg
    assert len(reg) == 2 and list(reg) == ["double", "triple"]


def test_duplicate_name_is_an_error():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match="'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1  # the first registration is kept


def test_unknown_name_lists_known_names_and_suggests():
    reg = Registry("loss")
    for name in ("focal", "forward_kl", "ce"):
        reg.register(name, object())
    with pytest.raises(KeyError) as info:
        reg.get("focall")
    msg = str(info.value)
    assert "unknown loss 'focall'" in msg and "Did you mean 'focal'" in msg
    assert "Known: ce, focal, forward_kl" in msg


@pytest.mark.parametrize("bad", ["", None, 3])
def test_names_must_be_non_empty_strings(bad):
    with pytest.raises(RegistryError, match="non-empty string"):
        Registry("x").register(bad, 1)


def test_build_needs_callable():
    reg = Registry("x")
    reg.register("const", 5)
    with pytest.raises(RegistryError, match="not callable"):
        reg.build("const")
