"""The public surface: one import path per name, every exported name in docs/API.md."""

import importlib
import inspect
import pathlib
import re

import pytest

import udd_jax

PACKAGES = ("udd_jax.driver", "udd_jax.bilevel", "udd_jax.inner", "udd_jax.training", "udd_jax.heads",
            "udd_jax.evaluation", "udd_jax.data", "udd_jax.supervised", "udd_jax.sharding")
API = pathlib.Path(__file__).resolve().parent.parent / "docs" / "API.md"


def exported(package):
  module = importlib.import_module(package)
  names = getattr(module, "__all__", None) if not hasattr(module, "__path__") else None  # a plain module's own list
  return {n: v for n, v in vars(module).items()
          if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations" and (names is None or n in names)}


def section(package):
  text = API.read_text()
  match = re.search(rf"^## `{re.escape(package)}`\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
  return match.group(1) if match else ""


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_reexports_only_what_it_defines(package):
  for name, value in exported(package).items():
    defined_in = getattr(value, "__module__", None)
    if defined_in is None or not (inspect.isclass(value) or inspect.isfunction(value)):
      continue
    assert defined_in == package or defined_in.startswith(package + "."), f"{package}.{name} is re-exported from {defined_in}"


@pytest.mark.parametrize("package", ("udd_jax",) + PACKAGES)
def test_every_exported_name_is_in_docs_api(package):
  documented = set(re.findall(r"^\| `([A-Za-z_0-9]+)` \|", section(package), flags=re.M))
  names = set(exported(package))
  if package != "udd_jax":
    names -= set(exported("udd_jax"))  # imported from the top level, listed there
  assert names - documented == set(), f"not in docs/API.md under {package}: {sorted(names - documented)}"
  assert documented - names == set(), f"docs/API.md lists names {package} does not export: {sorted(documented - names)}"
