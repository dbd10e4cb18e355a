-- Runs once after the regression database is created. It has no users
-- table, so the extension installs without the foreign key and says so.
CREATE EXTENSION makima_keys;
