"""`canonrl claims list | show ID | run ID | report`: papers' claims as pre-stated tests (`canonrl.lab.claims`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from canonrl.lab.cli import _int_list, _progress, console, lab_command

claims_app = typer.Typer(help="Papers' claims as pre-stated tests: list, show, run, report.", no_args_is_help=True)

FILE_OPTION = typer.Option(None, "--file", "-f", help="a claims file (default: the shipped canonrl/lab/claims.yaml)")


@claims_app.command("list")
def list_command(file: Path = FILE_OPTION) -> None:
    """Every claim: id, paper, configurations, seeds, budget."""
    from canonrl.lab.claims import load_claims

    with lab_command():
        claims = load_claims(file)
    for claim in claims.values():
        console.print(
            f"[bold]{claim.id}[/bold]  {claim.paper['title']} (arXiv {claim.paper['arxiv']}): "
            f"{', '.join(claim.configurations)}; {len(claim.seeds)} seeds, {claim.budget['steps']} steps, "
            f"~{claim.budget['minutes']} min, {len(claim.tests)} test(s)",
            highlight=False, soft_wrap=True,
        )


@claims_app.command("show")
def show_command(claim_id: str = typer.Argument(..., help="a claim id (see `canonrl claims list`)"),
                 file: Path = FILE_OPTION) -> None:
    """One claim as written in the claims file, with its tests resolved."""
    import yaml

    from canonrl.lab.claims import load_claims

    with lab_command():
        claims = load_claims(file)
        if claim_id not in claims:
            raise ValueError(f"no claim {claim_id!r}; known: {', '.join(claims)}")
    typer.echo(yaml.safe_dump(claims[claim_id].to_dict(), sort_keys=False, allow_unicode=True), nl=False)


@claims_app.command("run")
def run_command(
    claim_id: str = typer.Argument(..., help="a claim id (see `canonrl claims list`)"),
    overrides: list[str] = typer.Argument(None, help="extra overrides key=value: recorded as a deviation from the claim"),
    out: Path = typer.Option(None, "--out", "-o", help="report folder (default reports/claims/<id>)"),
    seeds: str = typer.Option(None, help="comma-separated seeds (default: the claim's; others are a deviation)"),
    jobs: int = typer.Option(2, help="runs in parallel"),
    file: Path = FILE_OPTION,
) -> None:
    """Run a claim's pre-stated test (resuming finished runs), then write verdict.json and verdict.md."""
    from canonrl.lab.claims import load_claims, run_claim

    with lab_command():
        claims = load_claims(file)
        if claim_id not in claims:
            raise ValueError(f"no claim {claim_id!r}; known: {', '.join(claims)}")
        claim = claims[claim_id]
        seed_list = _int_list(seeds, "--seeds") if seeds else claim.seeds
        out = out or Path("reports") / "claims" / claim_id
        count = len(claim.configurations) * len(seed_list)
        console.print(f"{claim_id}: {count} runs ({len(claim.configurations)} configurations x {len(seed_list)} seeds), "
                      f"{jobs} at a time, about {claim.budget['minutes']} min -> {out}", highlight=False)
        with _progress() as progress:
            record = run_claim(claim, out, seeds=seed_list, overrides=overrides or [], jobs=jobs,
                               command="canonrl claims " + " ".join(sys.argv[2:]), progress=progress)
    for entry in record["tests"]:
        console.print(f"{entry['test']['metric']}: [bold]{entry['verdict']}[/bold] — {entry['reason']}", highlight=False)
    console.print(f"claim {claim_id}: [bold]{record['verdict']}[/bold]; {out / 'verdict.md'}", highlight=False)


@claims_app.command("report")
def report_command(
    results: Path = typer.Option(Path("reports/claims"), "--from", help="folder of claim folders holding verdict.json"),
    page: Path = typer.Option(Path("docs/claims.md"), "--out", "-o", help="the page to write (plots go to <its dir>/claims/)"),
    file: Path = FILE_OPTION,
) -> None:
    """Publish the verdict.json files of `--from` into <page dir>/claims/ and write docs/claims.md from every
    published verdict; claims not yet run are listed as "not run"."""
    from canonrl.lab.claims import load_claims, publish_verdicts, published_verdicts, write_claims_page

    with lab_command():
        claims = load_claims(file)
        verdicts = sorted(results.glob("*/verdict.json")) if results.is_dir() else []
        folder = page.parent / "claims"
        publish_verdicts(verdicts, folder)
        published = published_verdicts(folder)
        written = write_claims_page(claims, published, page)
    console.print(f"{written}: {len(verdicts)} new verdict(s), {len(published)} published, {len(claims)} claim(s)",
                  highlight=False)
