-- dead_letter_entry: an entry that is not a job (no usable id) leaves the stream for the
-- dead-letter stream, with what it carried, so nothing vanishes unseen.
-- KEYS[1] stream  KEYS[2] dead stream  KEYS[3] stats hash
-- ARGV[1] entry id  ARGV[2] group  ARGV[3] reason  ARGV[4] body  ARGV[5] deliveries  ARGV[6] now
redis.call("XADD", KEYS[2], "*", "stream", KEYS[1], "entry", ARGV[1], "reason", ARGV[3],
  "deliveries", ARGV[5], "job", "", "body", ARGV[4], "at", ARGV[6])
redis.call("XACK", KEYS[1], ARGV[2], ARGV[1])
redis.call("XDEL", KEYS[1], ARGV[1])
redis.call("HINCRBY", KEYS[3], "dead_lettered", 1)
return 1
