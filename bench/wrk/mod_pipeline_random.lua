-- PATCH /mod pipelined as mod_pipeline.lua, but each of the DEPTH charges
-- in a write on a funded account picked at random: PREFIX0 .. PREFIX(N-1),
-- `by=-1&min=0`.  Where mod_pipeline.lua's writes overlap (write i charges
-- credentials i .. i+DEPTH-1, so a batch charges each of its accounts many
-- times), a batch here charges ~N(1 - e^(-mods/N)) accounts: the case in
-- which a store gains little from an account's changes sharing a record.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_pipeline_random.lua URL -- PREFIX N [DEPTH] [SEED]
--
-- The N requests are formatted once, in init; `request` concatenates DEPTH.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   depth = tonumber(args[3] or "16")
   math.randomseed(tonumber(args[4] or "1"))
   reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("PATCH", "/mod?cred=" .. prefix .. (i - 1) .. "&by=-1&min=0")
   end
   count = n
   picked = {}
end

request = function()
   for j = 1, depth do
      picked[j] = reqs[math.random(count)]
   end
   return table.concat(picked, "", 1, depth)
end
