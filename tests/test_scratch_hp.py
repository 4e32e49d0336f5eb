import json, pytest
from ftlab.run import run
from tests.conftest import tiny_overrides

@pytest.mark.parametrize("model,stage", [("tiny_t5", "text2text"), ("tiny_gpt2", "cloze"), ("tiny_gpt2", "text2text"), ("tiny_roberta", "cloze")])
def test_aux(model, stage, make_cfg, sentiment_dir, tmp_path):
    extra = ["stage.task.verbalizer={pos: great, neg: bad}"] if stage == "cloze" else []
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [f"model={model}", f"stage={stage}", "stage.aux_mlm_weight=0.1", "trainer.max_steps=2", *extra])
    try:
        rec = run(cfg); print("\nRESULT", model, stage, rec["status"], rec["stages"][stage]["metrics"].get("val/loss"))
    except SystemExit:
        print("\nRESULT", model, stage, json.loads((tmp_path / "run" / "metrics.json").read_text())["error"][:300])
