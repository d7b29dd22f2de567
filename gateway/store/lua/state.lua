-- The batch's state (abandoned commits resolved on the way).
return current()
