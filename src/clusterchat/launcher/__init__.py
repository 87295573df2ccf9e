"""Everything around the nodes: throw-away Redis and databases (`backends`), nginx in front
(`nginx`), and `clusterchat cluster`, which starts and supervises all of it (`cluster`)."""
