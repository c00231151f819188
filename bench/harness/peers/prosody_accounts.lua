-- Make the benchmark's accounts with Prosody's own user manager, all in one process
-- (prosodyctl register starts a process per account: minutes for thousands).
-- usage: lua5.4 prosody_accounts.lua SOURCE_DIR CONFIG DOMAIN COUNT USER_PREFIX PASS_PREFIX
local source, config, domain, count, user_prefix, pass_prefix = ...
count = assert(tonumber(count), "COUNT must be a number")

-- What prosodyctl sets before it loads anything (see its first lines).
CFG_SOURCEDIR, CFG_PLUGINDIR = source, source .. "/modules/"  -- luacheck: ignore
CFG_CONFIGDIR = config:match("^(.*)/")                        -- luacheck: ignore
package.path = source .. "/?.lua;" .. package.path
package.cpath = source .. "/?.so;" .. package.cpath
arg = { "--config", config }                                  -- luacheck: ignore
require "util.startup".prosodyctl()
local ctl = require "util.prosodyctl"

local made = 0
for i = 1, count do
	local account = { user = user_prefix .. i, host = domain, password = pass_prefix .. i }
	if not ctl.user_exists(account) then
		local ok, err = ctl.adduser(account)
		if not ok then error(account.user .. ": " .. tostring(err)) end
		made = made + 1
	end
end
print(("%d accounts made, %d existed"):format(made, count - made))
