"""Regenerate deploy/k8s/configmap.yaml from config/ (run: python deploy/configmap.py).

The same text ``kubectl create configmap leadflow-config --from-file=config/
--dry-run=client -o yaml`` gives, without needing kubectl; a test keeps the two in step.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# Generated from config/: kubectl create configmap leadflow-config --from-file=config/"
    " --dry-run=client -o yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n"
    "  name: leadflow-config\ndata:\n"
)


def main() -> None:
    """Write the ConfigMap holding every file of config/."""
    blocks = [
        f"  {path.name}: |\n"
        + "".join(f"    {line}\n" if line else "\n" for line in path.read_text().splitlines())
        for path in sorted((ROOT / "config").iterdir())
    ]
    (ROOT / "deploy/k8s/configmap.yaml").write_text(HEADER + "".join(blocks))


if __name__ == "__main__":
    main()
