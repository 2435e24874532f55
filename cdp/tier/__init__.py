"""History off the box: sealed history tiered to S3 object storage (issue 26).

``cdp.tier.s3`` is the one place cdp makes its S3 client and talks S3.
"""
