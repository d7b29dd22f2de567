-- Evaluate after a commit, so that an empty batch, or one whose jobs all ran, fires at once.
-- ARGV[6] the token of any claim this makes. Returns the claims made.
return evaluate(ARGV[6])
