import dataclasses
import hashlib
import json
import shutil
import typing

import pytest

from benchmark import profile_schema as schema
from benchmark import profiles
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


# sha256 of each resolved profile's canonical JSON less its speed section (json.dumps(numbers_of(profile),
# sort_keys=True): what enters a run's config hash). A deliberate profile change updates them; any change
# alters the config hash of every run of that profile, so its finished records stop counting (they turn
# stale). A speed option changes none of them.
RESOLVED_SHA256 = {
    "smoke": "2c8897e32efadf84828599494f4a93011884d95f85f9dc999d650ae9a91803f0",
    "cpu": "b626373aa43494a7bd63f00398def6abb7607042b6274e902f55f24381bfc7fe",
    "gpu": "d1cfcc3069ca387b8b39074fb139d1ba4409868948dfee6767a518effc1b95ba",
    "paper": "1a3a8feee23158b2a7098b629fc57ed540f05601a9782d1989404ccfdae1e648",
}


@pytest.mark.parametrize("name", sorted(RESOLVED_SHA256))
def test_resolved_profiles_are_unchanged(name):
    from benchmark.run.spec import numbers_of

    blob = json.dumps(numbers_of(load_profile(name)), sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest() == RESOLVED_SHA256[name]


def test_base_is_not_a_runnable_profile():
    assert "base" not in available_profiles()
    with pytest.raises(ProfileError, match="'base' holds the defaults.*choose one of: cpu"):
        load_profile("base")


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """A profile folder with the real base.yaml, where a test writes its own profiles."""
    shutil.copy(profiles.PROFILE_DIR / "base.yaml", tmp_path / "base.yaml")
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)

    def write(name, text):
        (tmp_path / f"{name}.yaml").write_text(text)

    return write


def test_a_child_lists_what_differs_and_null_removes(profile_dir):
    profile_dir("mine", "extends: base\ndescription: x\ntraining:\n  steps: 7\ndecoder_finetune: ~\n")
    p = load_profile("mine")
    assert p.training.steps == 7 and p.training.warmup_fraction == pytest.approx(1 / 30)  # merged key by key
    assert "decoder_finetune" not in p and "extends" not in p and p.name == "mine"


def test_an_unknown_key_in_a_profile_file_names_the_closest(profile_dir):
    profile_dir("mine", "extends: base\ndescription: x\ntraining:\n  stepz: 3\n")
    with pytest.raises(ProfileError, match=r"mine\.yaml: unknown key 'training\.stepz' in section 'training'; "
                                           r"did you mean 'training\.steps'\?"):
        load_profile("mine")


def test_a_wrong_type_or_a_missing_key_in_a_profile_file_is_named(profile_dir):
    profile_dir("typed", "extends: base\ndescription: x\nprobe:\n  subjects: many\n")
    with pytest.raises(ProfileError, match="'probe.subjects' expects an integer, got 'many'"):
        load_profile("typed")
    profile_dir("short", "extends: base\ndescription: x\nsampling:\n  n_test: ~\n")
    with pytest.raises(ProfileError, match="profile 'short': key 'sampling.n_test' is missing"):
        load_profile("short")


def test_a_misspelt_method_setting_in_a_profile_file_stops_at_loading(profile_dir):
    profile_dir("mine", "extends: base\ndescription: x\nmethods:\n  vcm:\n    l1_weigth: 1.0\n")
    with pytest.raises(ProfileError, match=r"profile 'mine': method 'vcm' has no setting 'l1_weigth' \(did you mean "
                                           r"'l1_weight'\?\)"):
        load_profile("mine")


def test_a_cycle_or_a_missing_parent_is_refused(profile_dir):
    profile_dir("a", "extends: b\n")
    profile_dir("b", "extends: a\n")
    with pytest.raises(ProfileError, match=r"profile 'a' extends itself \(a -> b -> a\)"):
        load_profile("a")
    profile_dir("orphan", "extends: nothere\n")
    with pytest.raises(ProfileError, match="profile 'orphan' extends 'nothere', which is not a profile"):
        load_profile("orphan")


@pytest.mark.parametrize("override, message", [
    ("training.stepz=3", r"no setting 'training\.stepz' in the profile; did you mean 'training\.steps'\?"),
    ("training.steps=abc", r"'training\.steps' expects an integer, got 'abc'"),
    ("probe.enabled=3", r"'probe\.enabled' expects true or false, got '3'"),
    ("trainig.steps=3", r"'trainig' is not a section of the profile; did you mean 'training'\?"),
])
def test_overrides_go_through_the_schema(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", [override])


def test_an_override_takes_numbers_yaml_reads_as_strings_and_optional_keys():
    p = load_profile("cpu", ["tuning.learning_rates=[1e-3, 3e-3]", "autoencoder.crop=[16, 16, 16]"])
    assert p.tuning.learning_rates == [1e-3, 3e-3] and p.autoencoder.crop == [16, 16, 16]


def test_every_schema_key_has_a_meaning_and_no_default():
    sections = [schema.ProfileSchema]
    while sections:
        cls = sections.pop()
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"] and f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name}"
        sections += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
