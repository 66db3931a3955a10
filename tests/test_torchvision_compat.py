"""crackray/_torchvision_compat.py: torchvision imports on this CPU torch, and the patch stays
out of the way where torchvision's compiled extension loads.

Each check runs in a fresh interpreter, because the patch acts once, before the first
`import torchvision`, and this test process has imported torchvision long before.
"""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_torchvision_and_torchmetrics_import_after_crackray():
    out = _run(
        """
        import crackray, torch, torchvision, torchmetrics
        from torchmetrics.functional.classification import binary_f1_score
        model = torchvision.models.resnet18(weights=None).eval()
        with torch.no_grad():
            print(tuple(model(torch.randn(1, 3, 64, 64)).shape))
        print(binary_f1_score(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])).item())
        """
    )
    assert out.split() == ["(1,", "1000)", "1.0"]


def test_importing_crackray_loads_no_torch():
    # The patch waits for torchvision's import: crackray's light modules (the Train
    # controller's callback, the CLI's config checks) do not pay torch's import.
    out = _run(
        """
        import sys
        import crackray.tune.reuse
        print("torch" in sys.modules, "torchvision" in sys.modules)
        """
    )
    assert out.split() == ["False", "False"]


def test_patch_does_nothing_where_the_extension_loads():
    # Simulate a machine whose extension loads by making torch's loader succeed, the one call
    # `_extension_loads` depends on; then no schema may be defined, neither at import nor on
    # a later call. The control at the end shows the same check does see a patch.
    out = _run(
        """
        import sys, torch
        torch.ops.load_library = lambda path: None
        import crackray._torchvision_compat as compat
        def defined():
            return hasattr(torch.ops.torchvision, "nms")
        assert "torchvision" not in sys.modules
        assert compat._extension_loads() is True
        import importlib.util
        importlib.util.find_spec("torchvision")  # what `import torchvision` asks first
        assert compat._library is None and not defined(), "patched at import"
        assert compat.ensure_torchvision_importable() is False
        assert compat._library is None and not defined(), "patched on a call"
        compat._extension_loads = lambda: False  # control: an extension that fails to load
        assert compat.ensure_torchvision_importable() is True and defined()
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_patch_applies_exactly_where_the_extension_fails():
    # On this CPU machine (CPU torch, CUDA torchvision wheel) the extension fails and the
    # first `import torchvision` patches; on a matching install it loads and nothing is
    # patched. Either way `torchvision::nms` exists afterwards, which `import torchvision`
    # needs.
    out = _run(
        """
        import torch
        import crackray._torchvision_compat as compat
        assert compat._library is None  # nothing yet: torchvision is not imported
        import torchvision
        print(compat._extension_loads(), compat._library is not None,
              hasattr(torch.ops.torchvision, "nms"))
        """
    )
    loads, patched, defined = (word == "True" for word in out.split())
    assert patched is not loads
    assert defined
