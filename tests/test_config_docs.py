"""The README's configuration tables are serve_app.config's, as config_docs prints them."""

from pathlib import Path

from serve_app import config_docs
from serve_app.config import AppArgs, AutoscalingArgs, ModelArgs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_tables() -> str:
    text = README.read_text()
    assert text.count(config_docs.BEGIN) == 1 and text.count(config_docs.END) == 1, "config markers missing"
    return text.split(config_docs.BEGIN, 1)[1].split(config_docs.END, 1)[0].strip()


def test_readme_config_tables_match_the_generator():
    assert readme_tables() == config_docs.render().strip(), (
        "README.md's configuration tables are stale: paste the output of "
        "`python -m serve_app.config_docs` between its config markers")


def test_every_field_has_a_description_that_fits_one_table_line():
    for model in (ModelArgs, AutoscalingArgs, AppArgs):
        for name, field in model.model_fields.items():
            if name == "autoscaling":  # expanded into its own fields' lines
                continue
            assert field.description, f"{model.__name__}.{name} has no description"
            assert "|" not in field.description, f"{model.__name__}.{name}: '|' breaks the table"
