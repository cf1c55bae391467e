"""A method's settings are a typed dataclass built from its profile section (issue 29): a misspelt,
missing or mistyped key stops with a sentence naming it; a plugin's defaults need no profile edit;
every shipped profile's sections build for every registered method."""
from dataclasses import dataclass, field

import pytest

from benchmark.profiles import available_profiles, load_profile
from methods import registry
from methods.base import Method, MethodError
from methods.registry import declared_settings, get_method, known_methods, method_settings
from tests.fixtures import fresh_registry  # noqa: F401  (fixture)

LV = {"lv_mask": 1}


def smoke_section(name: str, **changes) -> dict:
    """The smoke profile's ``methods.<name>`` section with ``changes`` (None removes a key)."""
    section = {**load_profile("smoke").methods[name], **changes}
    return {key: value for key, value in section.items() if value is not None}


def test_a_misspelt_setting_names_the_method_and_the_closest_key():
    section = smoke_section("vcm", l1_weight=None, l1_weigth=1.0)
    sentence = (r"method 'vcm' has no setting 'l1_weigth' \(did you mean 'l1_weight'\?\); "
                r"fix the key in the profile's methods.vcm section")
    with pytest.raises(MethodError, match=sentence):
        method_settings("vcm", section)
    with pytest.raises(MethodError, match=sentence):  # the same stop when the method is built
        get_method("vcm")(None, LV, section)
    with pytest.raises(MethodError, match=r"has no setting 'zzz' \(it takes: hint_channels\)"):
        method_settings("controlnet_lite", smoke_section("controlnet_lite", zzz=1))


def test_a_wrong_type_names_the_expected_type_and_the_value():
    with pytest.raises(MethodError, match=r"method 'vcm' setting 'head_hidden' expects an integer, got '32'; "
                                          r"fix it in the profile's methods.vcm section"):
        method_settings("vcm", smoke_section("vcm", head_hidden="32"))
    with pytest.raises(MethodError, match=r"setting 'num_res_blocks' expects an integer, got True"):
        method_settings("vcm", smoke_section("vcm", num_res_blocks=True))
    with pytest.raises(MethodError, match=r"setting 'attention_levels' expects a list of booleans, got \[0, 0, 1\]"):
        method_settings("vcm", smoke_section("vcm", attention_levels=[0, 0, 1]))
    with pytest.raises(MethodError, match=r"setting 'lr' expects a number, got '1e-3'"):
        method_settings("liif3d", smoke_section("liif3d", lr="1e-3"))


def test_an_integer_for_a_number_is_the_float_the_code_read():
    settings = method_settings("vcm", smoke_section("vcm", l1_weight=1))
    assert settings.l1_weight == 1.0 and type(settings.l1_weight) is float
    assert method_settings("liif3d", smoke_section("liif3d", lr_milestones=[1])).lr_milestones == [1.0]


def test_a_missing_setting_names_it_and_the_profile_section():
    with pytest.raises(MethodError, match=r"method 'mcm' needs the setting 'methods.mcm.head_norm' in the profile; "
                                          r"add it to the profile's methods.mcm section"):
        method_settings("mcm", smoke_section("mcm", head_norm=None))
    with pytest.raises(MethodError, match=r"needs the setting 'methods.ldm_finetune.condition_downsample'"):
        method_settings("ldm_finetune", {})


@dataclass
class ScaledShiftSettings:
    scale: float = 0.5             # a default: the plugin runs without a profile section
    widths: list[int] = field(default_factory=lambda: [4, 8])


class ScaledShift(Method):
    Settings = ScaledShiftSettings


def test_a_plugins_defaults_need_no_profile_edit(fresh_registry):
    registry.register("scaled_shift_for_test")(ScaledShift)
    profile = load_profile("smoke")
    assert "scaled_shift_for_test" not in profile.methods
    method = get_method("scaled_shift_for_test", "lv")(None, LV, profile.methods.get("scaled_shift_for_test", {}))
    assert method.settings == ScaledShiftSettings(scale=0.5, widths=[4, 8])
    assert declared_settings("scaled_shift_for_test") == {"scale": 0.5, "widths": [4, 8]}
    overridden = load_profile("smoke", ["methods.scaled_shift_for_test.scale=2"]).methods.scaled_shift_for_test
    assert method_settings("scaled_shift_for_test", overridden).scale == 2.0


def test_settings_declared_as_a_dict_are_refused_with_the_fix(fresh_registry):
    old_form = type("OldForm", (Method,), {"settings": {"width": 16}})
    with pytest.raises(MethodError, match="method 'old_form_for_test' must declare its settings as a dataclass "
                                          "in the class attribute Settings"):
        registry.register("old_form_for_test")(old_form)


@pytest.mark.parametrize("profile_name", available_profiles())
def test_every_method_builds_its_settings_from_every_shipped_profile(profile_name):
    profile = load_profile(profile_name)
    for name in known_methods():
        method_settings(name, profile.methods.get(name, {}))
    unknown = sorted(set(profile.methods) - set(known_methods()))
    assert not unknown, f"profile '{profile_name}' has sections for no registered method: {unknown}"


def test_the_shipped_profiles_are_all_walked():
    assert {"smoke", "cpu", "gpu", "paper"} <= set(available_profiles())
