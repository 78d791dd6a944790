"""codsplat's AWS infrastructure as a CDK app: `cdk deploy` from aws/ (see docs/deploy.md)."""
