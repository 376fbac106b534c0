-- Members of the authentik group "guacamole-admins" (groups claim) get
-- full system permissions; OIDC users themselves are created on first login.
CREATE TYPE guacamole_system_permission_type AS ENUM (
    'CREATE_CONNECTION', 'CREATE_CONNECTION_GROUP', 'CREATE_SHARING_PROFILE',
    'CREATE_USER', 'CREATE_USER_GROUP', 'ADMINISTER'
);

CREATE TABLE guacamole_system_permission (
    entity_id  INTEGER NOT NULL
               REFERENCES guacamole_entity (entity_id) ON DELETE CASCADE,
    permission guacamole_system_permission_type NOT NULL,
    PRIMARY KEY (entity_id, permission)
);

INSERT INTO guacamole_entity (name, type) VALUES ('guacamole-admins', 'USER_GROUP');
INSERT INTO guacamole_user_group (entity_id)
    SELECT entity_id FROM guacamole_entity WHERE name = 'guacamole-admins';
INSERT INTO guacamole_system_permission (entity_id, permission)
    SELECT entity_id, 'ADMINISTER' FROM guacamole_entity WHERE name = 'guacamole-admins';
