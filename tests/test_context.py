"""Context for chat-template models: the model's own window (at least 12 turns and 1,024
tokens), trimmed oldest-first, the persona always kept; GPT-2 formats keep their limits."""
from __future__ import annotations

from engine.dialogue import CHAT_MIN_TOKENS, CHAT_MIN_TURNS, context_limits
from tests.conftest import build_gguf_llama

PERSONA = "You are Mynah, a friendly bird."


def test_a_gpt2_dialogue_model_keeps_full_fine_tuning_and_its_limits(tiny_dialogpt):
    from bots.app import fit_to_model
    from bots.config import Config
    from engine.model import load_model

    config = Config()
    config.learning.method = "auto"
    fitted = fit_to_model(config, load_model(str(tiny_dialogpt)))
    assert fitted.learning.method == "full"
    assert (fitted.generation.max_history_turns, fitted.generation.max_context_tokens) == (6, 256)


def test_limits_follow_the_models_window():
    assert context_limits("dialogpt", 1024, 6, 256, 40) == (6, 256)          # as configured
    assert context_limits("chitchat", 300, 6, 256, 40) == (6, 256)
    assert context_limits("chat_template", 8192, 6, 256, 40) == (CHAT_MIN_TURNS, CHAT_MIN_TOKENS)
    assert context_limits("chat_template", 8192, 30, 4000, 40) == (30, 4000)  # more, when asked for
    assert context_limits("chat_template", 512, 6, 256, 40) == (12, 472)      # never past the window


def test_context_keeps_the_persona_and_the_newest_turns(tmp_path):
    from engine.model import load_model

    gguf_file, _ = build_gguf_llama(tmp_path / "tiny.gguf")
    fmt = load_model(str(gguf_file)).fmt
    turns = [("user" if i % 2 == 0 else "bot", f"turn number {i} is here") for i in range(20)]
    n_turns, n_tokens = context_limits(fmt.name, 4096, 6, 256, 40)   # (12, 1024)
    text = fmt.tokenizer.decode(fmt.context_ids(turns[-n_turns:], n_tokens, system=PERSONA))
    assert text.count("turn number") == 12 and "turn number 8 " in text and "turn number 7 " not in text
    # a tight budget drops the oldest turns first; the persona and the newest turn stay
    tight = fmt.tokenizer.decode(fmt.context_ids(turns[-n_turns:], 200, system=PERSONA))
    assert PERSONA in tight and "turn number 19 " in tight and "turn number 8 " not in tight
    assert tight.index(PERSONA) < tight.index("turn number 19 ")
    assert tight.endswith("<|im_start|>assistant\n")


async def test_the_chat_service_reads_twelve_turns_of_a_chat_template_model(tmp_path):
    from bots.app import Mynah
    from bots.config import load_config

    gguf_file, _ = build_gguf_llama(tmp_path / "tiny.gguf")
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[model]\npath = "{gguf_file}"\n[storage]\npath = "{tmp_path / "db.sqlite3"}"\n'
                           '[learning]\nenabled = false\nmethod = "auto"\n'
                           '[generation]\nmmi_model = "starter-mmi"\nmmi_candidates = 4\n', encoding="utf-8")
    app = await Mynah.open(load_config(config_file))
    try:
        assert (app.config.generation.max_history_turns, app.config.generation.max_context_tokens) == (12, 216)
        chat_id = await app.store.chats.chat("console", "c1")
        for i in range(20):
            await app.store.messages.log_message(chat_id, "user" if i % 2 == 0 else "bot", f"turn {i}")
        context = await app.chat.build_context(chat_id)
        assert [t for _, t in context] == [f"turn {i}" for i in range(8, 20)]
        # a chat-template model learns through LoRA, and MMI (GPT-2 family only) is off, saying why
        assert app.config.learning.method == "lora" and app.config.generation.mmi_model == ""
        assert "MMI reranking: off (MMI reranks GPT-2-family" in await app.chat.admin.status_text()
    finally:
        await app.close()
