-- Write a roster between alice and bob and alice's vCard4 PEP item with Prosody's own
-- storage library, as a running Prosody would keep them (tests/integration/peers.py).
-- usage: lua5.4 prosody_seed.lua PROSODY_SOURCE_DIR CONFIG HOST
local source, config, host = ...
CFG_SOURCEDIR = source                                   -- luacheck: ignore
CFG_CONFIGDIR = config:match("^(.*)/[^/]*$")             -- luacheck: ignore
CFG_PLUGINDIR = source .. "/modules/"                    -- luacheck: ignore
package.path = source .. "/?.lua;" .. package.path
package.cpath = source .. "/?.so;" .. package.cpath
arg = { "--config", config }                             -- luacheck: ignore
require "util.startup".prosodyctl()
local storagemanager = require "core.storagemanager"
local st = require "util.stanza"
storagemanager.initialize_host(host)

local roster = storagemanager.open(host, "roster")
assert(roster:set("alice", {
	[false] = { version = 1, pending = {} },
	["bob@" .. host] = { subscription = "both", name = "Bobby", groups = { Friends = true } },
}))
assert(roster:set("bob", {
	[false] = { version = 1, pending = {} },
	["alice@" .. host] = { subscription = "both", groups = {} },
}))

local node = "urn:xmpp:vcard4"
assert(storagemanager.open(host, "pep"):set("alice", { [node] = { name = node, config = {} } }))
local vcard = st.stanza("vcard", { xmlns = "urn:ietf:params:xml:ns:vcard-4.0" })
	:tag("fn"):text_tag("text", "Alice Liddell"):up()
	:tag("nickname"):text_tag("text", "ally"):up()
assert(storagemanager.open(host, "pep_" .. node, "archive"):append("alice", "current", vcard, os.time()))
