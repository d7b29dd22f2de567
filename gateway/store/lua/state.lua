-- The batch's state.
return current()
