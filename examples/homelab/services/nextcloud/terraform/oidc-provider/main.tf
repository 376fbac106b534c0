# Registers authentik as an OpenID Connect provider in Nextcloud's user_oidc
# app. Runs in the service-config phase, once nextcloud answers.

terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 3.2"
    }
  }
}

variable "domain" {
  type        = string
  description = "Public domain of the Nextcloud instance"
}

variable "host" {
  type        = string
  description = "FQDN of the Nextcloud host (reached over SSH)"
}

variable "discovery_url" {
  type        = string
  description = "OpenID discovery document of the authentik provider"
}

resource "null_resource" "user_oidc_provider" {
  triggers = {
    domain        = var.domain
    discovery_url = var.discovery_url
  }

  provisioner "local-exec" {
    command = <<-EOT
      ssh root@${var.host} 'nextcloud-occ user_oidc:provider authentik \
        --clientid=nextcloud \
        --clientsecret="$(cat /run/secrets/nextcloud-oidc-secret)" \
        --discoveryuri=${var.discovery_url} \
        --unique-uid=0'
    EOT
  }
}

output "provider_name" {
  value = "authentik"
}
