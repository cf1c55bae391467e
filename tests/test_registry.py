import sys
from pathlib import Path

import pytest

from methods.base import Method
from methods.registry import (MethodError, get_method, known_methods, load_plugin, register, resolve_methods,
                              supported_tasks)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_method.py"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(MethodError, match="unknown method 'nope'; known methods: .*vcm"):
        get_method("nope")


def test_all_expands_to_methods_supporting_the_task():
    names = resolve_methods("all", "lv")
    assert names == sorted(names) and "vcm" in names
    assert all("lv" in supported_tasks(n) for n in names)
    assert "liif3d" not in names  # a super-resolution method: lv takes generation methods only


def test_method_asked_for_unsupported_task_is_an_error():
    @register("only_lv_for_test", tasks=("lv",))
    class OnlyLV(Method):
        pass

    with pytest.raises(MethodError, match="does not support task 'sr4'; it supports: lv"):
        resolve_methods("only_lv_for_test", "sr4")
    assert "only_lv_for_test" not in resolve_methods("all", "sr4")


def test_register_rejects_non_methods_and_name_clashes():
    with pytest.raises(MethodError, match="subclass of methods.base.Method"):
        register("not_a_method", tasks=("lv",))(object)
    with pytest.raises(MethodError, match="already registered"):
        register("vcm", tasks=("lv",))(type("Other", (Method,), {}))
    with pytest.raises(MethodError, match="tuple of task names"):
        register("string_tasks_for_test", tasks="lv")(type("Other", (Method,), {}))


def test_no_method_class_raises_in_an_inherited_method():
    """One interface (fit, generate) for both families: methods that make volumes themselves have no
    predict_noise at all, steering methods keep it."""
    from methods.base import DirectMethod

    for name in known_methods():
        cls = get_method(name)
        if not cls.__module__.startswith("methods."):
            continue  # a test's or a plugin's
        if issubclass(cls, DirectMethod):
            assert not hasattr(cls, "predict_noise") and cls.generate is not DirectMethod.generate, name
        else:
            assert issubclass(cls, Method) and cls.predict_noise is not Method.predict_noise, name


def test_plugin_file_registers_its_method():
    load_plugin(str(EXAMPLE))
    assert "residual_shift" in known_methods()
    assert supported_tasks("residual_shift") == ["lv", "multimodal", "sr4", "sr8", "sr4mm", "sr8mm"]  # no names: every task


def test_plugin_that_fails_to_import_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(MethodError, match="plugin .*broken_plugin.py' could not be imported .*not_a_real_module_xyz"):
        load_plugin(str(broken))
    with pytest.raises(MethodError, match="could not be imported"):
        load_plugin("no.such.module")
    sys.modules.pop("broken_plugin", None)
