"""Config validation: defaults, several deployments, and errors that quote bad values."""

from __future__ import annotations

import pytest

from mss.config import ClusterConfig, ConfigError, parse_config


def test_defaults_serve_the_bundled_model() -> None:
    config = ClusterConfig()
    (deployment,) = config.deployments
    assert deployment.name == "smollm2" and deployment.engine == "vllm"
    assert deployment.routing == "prefix_aware" and deployment.replicas == 1


def test_two_deployments_from_yaml() -> None:
    config = parse_config(
        """
deployments:
  - name: smollm2
    replicas: 2
  - name: echo
    engine: fake
    model: fake
    routing: round_robin
    engine_args: {token_interval_ms: 5}
"""
    )
    assert [d.name for d in config.deployments] == ["smollm2", "echo"]
    assert config.deployments[1].engine_args.token_interval_ms == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("deployments: [{name: a, replicas: -1}]", "deployments.0.replicas"),
        ("deployments: [{name: a, routing: fastest}]", '"fastest"'),
        ("deployments: [{name: a, engine: tgi}]", '"tgi"'),
        ("deployments: [{name: a}, {name: a}]", "'a' appears twice"),
        ("deployments: [{name: a, model: /no/such/dir}]", "/no/such/dir"),
        ("deployments: [{name: 'bad name'}]", '"bad name"'),
        ("gateway: {port: 70000}", "70000"),
        ("deployments: [{name: a, typo: 1}]", "typo"),
        ("[1, 2]", "must be a mapping"),
        ("deployments: [", "not valid YAML"),
    ],
)
def test_bad_values_are_quoted(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cluster.yaml")
    assert needle in str(info.value), str(info.value)
    assert str(info.value).startswith("cluster.yaml")
