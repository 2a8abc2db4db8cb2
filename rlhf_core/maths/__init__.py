"""The algorithms' maths, importing only torch: KL estimators, advantages, policy and value losses."""
