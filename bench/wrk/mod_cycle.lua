-- PATCH /mod charging existing accounts: credentials PREFIX0 .. PREFIX(N-1)
-- in turn, `by=-1&min=0` (the service's "charge only if the balance covers
-- it").  The driver funds the N accounts first, with enough that no charge
-- is refused during a run.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_cycle.lua URL -- PREFIX N
--
-- The N requests are formatted once, in init; `request` only picks the next.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("PATCH", "/mod?cred=" .. prefix .. (i - 1) .. "&by=-1&min=0")
   end
   count = n
   turn = 0
end

request = function()
   turn = turn % count + 1
   return reqs[turn]
end
