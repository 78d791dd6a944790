"""Recorded exceptions to the offline checks, each with its reason, next to the resource it concerns.

`acknowledge` → cdk-nag (CDK's `Validations.of(...).acknowledge`); `skip_checkov` → the template
Metadata that checkov reads (`checkov: {skip: [{id, comment}]}`).
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnResource, Validations
from constructs import IConstruct


def acknowledge(construct: IConstruct, rule: str, reason: str, all_policies: bool = False) -> None:
    """Acknowledge one cdk-nag finding on a construct (and, with `all_policies`, on the policies
    attached to it, where findings about a role's statements are reported)."""
    targets = [construct]
    if all_policies:
        targets += [c for c in construct.node.find_all() if c is not construct and c.node.id in ("DefaultPolicy", "Resource")]
    for target in targets:
        Validations.of(target).acknowledge(Acknowledgment(id=rule, reason=reason))


def skip_checkov(construct: IConstruct, check: str, comment: str) -> None:
    resource = construct if isinstance(construct, CfnResource) else construct.node.default_child
    meta = resource.get_metadata("checkov") or {"skip": []}
    meta["skip"].append({"id": check, "comment": comment})
    resource.add_metadata("checkov", meta)


def nag_form(construct: IConstruct, value: str) -> str:
    """How cdk-nag spells a resource in a finding id, as seen from `construct`'s stack
    (`<AWS::Region>` for a Ref, `<Logical.Arn>` for a GetAtt, the export name for an import)."""
    from aws_cdk import Stack

    def render(node) -> str:
        if isinstance(node, str):
            return node
        if "Ref" in node:
            return f"<{node['Ref']}>"
        if "Fn::GetAtt" in node:
            return f"<{'.'.join(node['Fn::GetAtt'])}>"
        if "Fn::ImportValue" in node:
            return render(node["Fn::ImportValue"])
        if "Fn::Join" in node:
            sep, parts = node["Fn::Join"]
            return sep.join(render(p) for p in parts)
        raise ValueError(f"no cdk-nag form for {node}")

    return render(Stack.of(construct).resolve(value))
