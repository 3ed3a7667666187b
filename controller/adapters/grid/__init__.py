"""The signed grid-order format: verifying (`verify`) and, for the operator's side, signing
(`sign`) compact JWS messages."""
