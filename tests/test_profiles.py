import pytest

from benchmark.profiles import ProfileError, available_profiles, load_profile


def test_the_four_profiles_exist_with_their_shapes():
    assert {"smoke", "cpu", "gpu", "paper"} <= set(available_profiles())
    assert tuple(load_profile("smoke").image_shape) == (32, 48, 32)
    assert tuple(load_profile("paper").image_shape) == (160, 224, 160)
    assert tuple(load_profile("gpu").image_shape) == (80, 112, 80)


def test_every_profile_has_the_sections_the_suite_reads():
    for name in available_profiles():
        p = load_profile(name)
        for section in ("data", "autoencoder", "diffusion", "scheduler", "training", "sampling", "methods"):
            assert section in p, f"profile {name} lacks '{section}'"
        assert list(p.data.sizes) == [10, 50, 500]


def test_override_changes_one_value_and_keeps_types():
    p = load_profile("smoke", ["training.steps=7", "training.lr=1e-3"])
    assert p.training.steps == 7 and p.training.lr == pytest.approx(1e-3)
    assert load_profile("smoke").training.steps != 7  # the file itself is untouched


@pytest.mark.parametrize("override, message", [
    ("training.steps", "key.subkey=value"),
    ("training.nonexistent=3", "no setting"),
    ("nosection.steps=3", "not a section"),
    ("training=3", "is a section"),
    ("training.steps=[1,", "not valid YAML"),
])
def test_malformed_overrides_are_clear_errors(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", [override])


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ProfileError, match="unknown profile 'huge'.*smoke"):
        load_profile("huge")


def test_profile_is_read_only_and_hash_follows_content():
    p = load_profile("smoke")
    with pytest.raises(TypeError):
        p["name"] = "x"  # noqa
    assert p.section_hash("autoencoder") == load_profile("smoke").section_hash("autoencoder")
    assert p.section_hash("autoencoder") != load_profile("smoke", ["autoencoder.steps=1"]).section_hash("autoencoder")
    with pytest.raises(AttributeError, match="no setting 'training.nope'"):
        p.training.nope
