"""XEP-0227 (Portable Import/Export Format for XMPP-IM Servers): `xmppctl import` and `export`.

`reader` turns export files (xmppd's, ejabberd's `export_piefxis`, Prosody's
`prosody-migrator` xep227 output) into `model.UserData`, checking everything
before anything is written; `credentials` reads the SCRAM keys both peers
write (ejabberd 23.01 base64-encodes them twice); `vcard4` converts Prosody's
vCard4 PEP item to vcard-temp; `stores` writes and reads the data through the
modules' own request handlers, with the modules loaded in this process as for
`xmppctl unregister` (no running node needed).
"""
