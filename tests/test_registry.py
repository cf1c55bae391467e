import sys
from pathlib import Path

import pytest

from methods.base import Method
from methods.registry import MethodError, get_method, known_methods, load_plugin, register, resolve_methods

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_method.py"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(MethodError, match="unknown method 'nope'; known methods: .*vcm"):
        get_method("nope")


def test_all_expands_to_methods_supporting_the_task():
    names = resolve_methods("all", "lv")
    assert names == sorted(names) and "vcm" in names
    assert all("lv" in get_method(n).tasks for n in names)


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


def test_plugin_file_registers_its_method():
    load_plugin(str(EXAMPLE))
    assert "residual_shift" in known_methods()
    assert "lv" in get_method("residual_shift").tasks


def test_plugin_that_fails_to_import_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(MethodError, match="plugin .*broken_plugin.py' could not be imported .*not_a_real_module_xyz"):
        load_plugin(str(broken))
    with pytest.raises(MethodError, match="could not be imported"):
        load_plugin("no.such.module")
    sys.modules.pop("broken_plugin", None)
