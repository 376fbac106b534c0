-- Guacamole JDBC auth schema (trimmed to the tables NixMox relies on).
CREATE TYPE guacamole_entity_type AS ENUM ('USER', 'USER_GROUP');

CREATE TABLE guacamole_entity (
    entity_id SERIAL PRIMARY KEY,
    name      VARCHAR(128) NOT NULL,
    type      guacamole_entity_type NOT NULL,
    CONSTRAINT guacamole_entity_name_scope UNIQUE (type, name)
);

CREATE TABLE guacamole_user (
    user_id        SERIAL PRIMARY KEY,
    entity_id      INTEGER NOT NULL UNIQUE
                   REFERENCES guacamole_entity (entity_id) ON DELETE CASCADE,
    password_hash  BYTEA NOT NULL,
    password_salt  BYTEA,
    password_date  TIMESTAMPTZ NOT NULL DEFAULT now(),
    disabled       BOOLEAN NOT NULL DEFAULT FALSE,
    expired        BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE guacamole_user_group (
    user_group_id SERIAL PRIMARY KEY,
    entity_id     INTEGER NOT NULL UNIQUE
                  REFERENCES guacamole_entity (entity_id) ON DELETE CASCADE,
    disabled      BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE guacamole_connection (
    connection_id   SERIAL PRIMARY KEY,
    connection_name VARCHAR(128) NOT NULL UNIQUE,
    protocol        VARCHAR(32) NOT NULL
);

CREATE TABLE guacamole_connection_parameter (
    connection_id   INTEGER NOT NULL
                    REFERENCES guacamole_connection (connection_id) ON DELETE CASCADE,
    parameter_name  VARCHAR(128) NOT NULL,
    parameter_value VARCHAR(4096) NOT NULL,
    PRIMARY KEY (connection_id, parameter_name)
);
